"""Markers, options and ini keys are registered; --help and --markers work anywhere."""

from __future__ import annotations

import os
import shutil
import sys

import pytest
from plugin_helpers import INNER_TIMEOUT, PLUGIN, ROOT, lit, plugin_args

from pytest_depfence.kernel import BCC_PATH_ENV
from pytest_depfence.plugin import MARKERS, UNAVAILABLE

OPTIONS = (
    "--depfence-upstream",
    "--depfence-no-egress",
    "--depfence-egress-only",
    "--depfence-mode",
    "--depfence-require",
    "--depfence-lab",
)

USES_EVERY_MARKER = """
    import pytest

    @pytest.mark.no_egress("github.com", "*.githubusercontent.com", "140.82.112.0/20")
    def test_no_egress(fenced):
        pass

    @pytest.mark.egress_only("mirror.internal")
    @pytest.mark.fence(mode="audit", outage="servfail", timeout=30)
    def test_egress_only(fenced):
        pass

    @pytest.mark.fence(mode="block")
    class TestClass:
        def test_method(self):
            pass
"""


def ini_key(option: str) -> str:
    return option[2:].replace("-", "_")


def test_markers_pass_strict_markers(run, pytester):
    pytester.makepyfile(test_markers=USES_EVERY_MARKER)

    result = run("--strict-markers", "-q")

    result.assert_outcomes(passed=1, skipped=2)  # no bcc here: the fenced ones skip


def test_strict_markers_is_really_strict(run, pytester):
    # Guards the test above: a misspelt marker must fail collection under --strict-markers.
    pytester.makepyfile(
        test_typo="""
        import pytest

        @pytest.mark.no_egres("github.com")
        def test_typo():
            pass
        """
    )

    result = run("--strict-markers")

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*'no_egres' not found in `markers` configuration option*"])


def test_markers_are_listed(run):
    result = run("--markers")

    assert result.ret == 0
    result.stdout.fnmatch_lines([lit(f"@pytest.mark.{text}") for text in MARKERS.values()])


def test_help_shows_every_option_and_ini_key_with_bcc_hidden(run):
    result = run("--help")

    assert result.ret == 0
    result.stdout.fnmatch_lines(["*dependency fence (pytest-depfence)*"])
    for option in OPTIONS:
        result.stdout.fnmatch_lines([f"*{option}*"])
        result.stdout.fnmatch_lines([f"  {ini_key(option)} (*):*"])
    assert result.stderr.str().strip() == ""


def test_help_works_with_bad_ini_values(run, pytester):
    # `pytest --help` is where a user goes to fix a bad setting; it must not refuse to run.
    pytester.makeini(
        """
        [pytest]
        depfence_upstream = example.com
        depfence_mode = strict
        depfence_require = maybe
        depfence_no_egress = https://github.com/org
        """
    )

    result = run("--help")

    assert result.ret == 0
    result.stdout.fnmatch_lines(["*--depfence-upstream*"])


@pytest.fixture
def unprivileged() -> tuple[str, ...]:
    """A command prefix that runs without any capability, as a plain user would."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("needs setpriv (util-linux) to drop root's capabilities")
    # Still uid 0, so pytester's private directories stay readable, but no capability at all.
    return (setpriv, "--inh-caps=-all", "--bounding-set=-all")


def test_help_works_unprivileged(pytester, unprivileged):
    result = pytester.run(
        *unprivileged, sys.executable, "-m", "pytest", *plugin_args(), "--help",
        timeout=INNER_TIMEOUT,
    )  # fmt: skip

    assert result.ret == 0
    for option in OPTIONS:
        result.stdout.fnmatch_lines([f"*{option}*"])


def test_unprivileged_session_skips_fenced_tests_with_the_reason(
    pytester, unprivileged, monkeypatch, empty_bcc_dir
):
    # Belt and braces: without capabilities nothing can be built, and bcc is hidden too.
    monkeypatch.setenv(BCC_PATH_ENV, str(empty_bcc_dir))
    pytester.makepyfile(
        test_fenced="""
        import pytest

        @pytest.mark.no_egress("github.com")
        def test_fenced(fenced):
            pass

        def test_plain():
            pass
        """
    )

    result = pytester.run(
        *unprivileged, sys.executable, "-m", "pytest", *plugin_args(),
        "-p", "no:cacheprovider", f"--basetemp={pytester.path / 'basetemp'}", "-rs",
        timeout=INNER_TIMEOUT,
    )  # fmt: skip

    result.assert_outcomes(passed=1, skipped=1)
    reason = lit(UNAVAILABLE.format(reason="@")).replace("@", "*CAP_*")
    result.stdout.fnmatch_lines([reason, f"SKIPPED [[]1[]] test_fenced.py:3: {reason}"])


def test_entry_point_loads_the_plugin(pytester, monkeypatch, tmp_path):
    """The pyproject's pytest11 entry point names the plugin module (installed-package view)."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    entry_points = project["project"]["entry-points"]["pytest11"]
    assert list(entry_points.values()) == [PLUGIN]
    (name,) = entry_points
    # A stand-in for an installed distribution: metadata with only the entry point.
    dist = tmp_path / "site" / "pytest_depfence_entrypoint-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: pytest-depfence-entrypoint\nVersion: 0\n"
    )
    (dist / "entry_points.txt").write_text(f"[pytest11]\n{name} = {PLUGIN}\n")
    pythonpath = [str(dist.parent), str(ROOT), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in pythonpath if p))
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)

    # No -p here: the entry point alone must bring the markers in.
    result = pytester.runpytest_subprocess("--markers", timeout=INNER_TIMEOUT)

    assert result.ret == 0
    result.stdout.fnmatch_lines([lit(f"@pytest.mark.{MARKERS['no_egress']}")])


def test_dash_p_loads_the_plugin_without_entry_points(pytester, monkeypatch):
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    )

    result = pytester.runpytest_subprocess("-p", PLUGIN, "--markers", timeout=INNER_TIMEOUT)

    assert result.ret == 0
    result.stdout.fnmatch_lines([lit(f"@pytest.mark.{MARKERS['egress_only']}")])


def test_project_settings_collect_cleanly(run, monkeypatch):
    """Plain `pytest` in the checkout (its pyproject: testpaths, --strict-markers) collects."""
    assert "--strict-markers" in (ROOT / "pyproject.toml").read_text()
    monkeypatch.chdir(ROOT)  # testpaths apply only when pytest starts in the rootdir

    result = run("--collect-only", "-q")

    assert result.ret == 0
    for suite in ("examples", "tests/plugin"):  # testpaths order is not this order
        result.stdout.fnmatch_lines([f"{suite}/*::test_*"])
    result.stdout.fnmatch_lines(["* collected in *"])
    assert "error" not in result.stdout.lines[-1]


def test_project_settings_accept_every_marker(run, pytester):
    pytester.makepyprojecttoml((ROOT / "pyproject.toml").read_text())
    pytester.makepyfile(test_markers=USES_EVERY_MARKER)

    result = run("test_markers.py")

    result.assert_outcomes(passed=1, skipped=2)  # no bcc here: the fenced ones skip
