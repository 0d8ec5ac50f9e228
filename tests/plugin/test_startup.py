"""No cost without fences: a session whose tests never use `fenced` loads none of the fence.

The inner session's conftest writes `sys.modules` at `pytest_sessionfinish`, after
the plugin ran every hook it has for such a session (options, settings, the
report header's machine check, collection, each test's reports). bcc stays
findable in these sessions, so the header's check really looks for it; none of
them builds a fence (no test uses `fenced`). `bench/bench_startup.py` measures the
same in milliseconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

#: What only a fence needs: the fence itself, bcc, the lab's netlink library, and the
#: kernel package's toolkit, ABI and program set (the header's machine check imports the
#: package for `preflight`, which loads only its `machine`: kernel/__init__.py).
HEAVY = (
    "pytest_depfence.fence",
    "bcc",
    "pyroute2",
    "pytest_depfence.kernel.toolkit",
    "pytest_depfence.kernel.abi",
    "pytest_depfence.kernel.programs",
)
#: The DNS library, which only the proxy, the judge and the lab use.
DNS = "dnslib"

RECORD_MODULES = """
    import json
    import sys
    from pathlib import Path


    def pytest_sessionfinish(session):
        loaded = sorted(name for name in sys.modules)
        Path(__file__).with_name("modules.json").write_text(json.dumps(loaded))
"""

PLAIN_TESTS = """
    import pytest


    def test_one():
        assert 1 + 1 == 2


    @pytest.mark.parametrize("n", range(5))
    def test_many(n):
        assert n < 5


    class TestGroup:
        def test_method(self):
            pass
"""


@pytest.fixture
def unfenced_modules(run, pytester) -> list[str]:
    """The modules loaded by a whole session of plain tests, with the plugin active."""
    pytester.makeconftest(RECORD_MODULES)
    pytester.makepyfile(test_plain=PLAIN_TESTS)

    result = run(bcc=True)  # bcc findable: the header's check looks for it for real

    result.assert_outcomes(passed=7)
    # The header ran its machine check (whatever it found on this machine).
    result.stdout.fnmatch_lines(["depfence: *"])
    loaded: list[str] = json.loads((pytester.path / "modules.json").read_text())
    assert "pytest_depfence.plugin" in loaded, "the plugin was not active in the inner session"
    return loaded


def _imported(loaded: list[str], top: str) -> list[str]:
    return [name for name in loaded if name == top or name.startswith(top + ".")]


def test_a_session_without_fences_loads_no_fence_and_no_bcc(unfenced_modules):
    for top in HEAVY:
        assert _imported(unfenced_modules, top) == [], f"{top} was imported"


def test_a_session_without_fences_loads_no_dns_library(unfenced_modules):
    assert _imported(unfenced_modules, DNS) == [], f"{DNS} was imported"


def test_the_header_finds_bcc_where_loading_it_would():
    """`locate_bcc` (the header's, nothing loaded) and `import_bcc` (a fence's) agree."""
    probe = textwrap.dedent(
        """
        import json, sys
        from pytest_depfence.errors import FenceUnavailable
        from pytest_depfence.kernel import machine
        try:
            where, version = machine.locate_bcc()
        except FenceUnavailable as exc:
            print(json.dumps({"missing": str(exc)}))
            sys.exit(0)
        assert "bcc" not in sys.modules, "locate_bcc loaded bcc"
        bcc = machine.import_bcc()
        print(json.dumps({"located": [str(where), version], "loaded": [
            str(__import__("pathlib").Path(bcc.__file__).parent), machine.bcc_version(bcc)]}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    found = json.loads(proc.stdout)
    if "missing" in found:
        pytest.skip(f"bcc is not installed here: {found['missing']}")
    assert found["located"] == found["loaded"]


def test_a_missing_bcc_reads_the_same_found_or_loaded(monkeypatch, tmp_path):
    from pytest_depfence.errors import FenceUnavailable
    from pytest_depfence.kernel import BCC_PATH_ENV, machine

    monkeypatch.setenv(BCC_PATH_ENV, str(tmp_path))
    monkeypatch.delitem(sys.modules, "bcc", raising=False)
    with pytest.raises(FenceUnavailable) as located:
        machine.locate_bcc()
    with pytest.raises(FenceUnavailable) as loaded:
        machine.import_bcc()
    assert str(located.value) == str(loaded.value)
    assert located.value.fix == machine.BCC_INSTALL_HINT
