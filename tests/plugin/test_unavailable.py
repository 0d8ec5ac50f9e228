"""When the fence cannot be built: fenced tests skip (or fail on request) with the reason."""

from __future__ import annotations

import json
import platform

import pytest
from plugin_helpers import lit

from pytest_depfence.cgroup import cgroup2_mount
from pytest_depfence.errors import FenceUnavailable
from pytest_depfence.kernel import BCC_INSTALL_HINT
from pytest_depfence.plugin import UNAVAILABLE
from pytest_depfence.plugin.settings import REQUIRED_IN_CI

MIXED = """
    import pytest

    @pytest.mark.no_egress("github.com")
    def test_fenced(fenced):
        fenced.run(["true"])

    def test_unfenced():
        pass

    @pytest.mark.no_egress("github.com")
    class TestHelpers:
        def test_marked_by_its_class_but_unfenced(self):
            pass
"""

#: The reason when bcc is hidden: what is missing, then the exact install command.
NO_BCC = lit(UNAVAILABLE.format(reason="@")).replace(
    "@", f"bcc is not installed*{lit(BCC_INSTALL_HINT)}"
)


def test_fenced_test_is_skipped_with_the_reason(run, pytester):
    pytester.makepyfile(test_mixed=MIXED)

    result = run("-rs")

    result.assert_outcomes(passed=2, skipped=1)
    result.stdout.fnmatch_lines([f"SKIPPED [[]1[]] test_mixed.py:*: {NO_BCC}"])
    assert "apt-get install python3-bpfcc" in result.stdout.str()


@pytest.mark.parametrize(
    ("args", "ini"),
    [
        (("--depfence-require",), None),
        ((), "depfence_require = true"),
        (("--depfence-require",), "depfence_require = false"),  # CLI over ini
    ],
    ids=["cli", "ini", "cli-over-ini"],
)
def test_require_fails_with_the_same_reason(run, pytester, args, ini):
    pytester.makepyfile(test_mixed=MIXED)
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")

    result = run(*args)

    # A fixture that fails makes a setup error; either way the run fails.
    result.assert_outcomes(passed=2, errors=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        ["*ERROR at setup of test_fenced*", NO_BCC, "*ERROR test_mixed.py::test_fenced*"]
    )
    assert "Traceback" not in result.stdout.str()  # pytrace=False: the reason, not our code


@pytest.mark.parametrize(
    ("variable", "value"), [("CI", "true"), ("GITHUB_ACTIONS", "true"), ("CI", "1")]
)
def test_in_ci_a_fence_that_cannot_be_built_fails(run, pytester, monkeypatch, variable, value):
    pytester.makepyfile(test_mixed=MIXED)
    monkeypatch.setenv(variable, value)

    result = run("--junitxml=junit.xml")

    result.assert_outcomes(passed=2, errors=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    why = lit(REQUIRED_IN_CI.format(variable=variable, value=value))
    result.stdout.fnmatch_lines(
        [
            f"depfence: fenced tests fail ({why}); upstream *",
            "*ERROR at setup of test_fenced*",
            NO_BCC,
            why,
        ]
    )


@pytest.mark.parametrize(
    ("args", "ini"),
    [(("--depfence-no-require",), None), ((), "depfence_require = false")],
    ids=["cli", "ini"],
)
def test_in_ci_the_user_can_opt_out_explicitly(run, pytester, monkeypatch, args, ini):
    pytester.makepyfile(test_mixed=MIXED)
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    monkeypatch.setenv("CI", "true")

    result = run("-rs", *args)

    result.assert_outcomes(passed=2, skipped=1)
    result.stdout.fnmatch_lines([f"SKIPPED [[]1[]] test_mixed.py:*: {NO_BCC}"])


@pytest.mark.parametrize("value", ["", "false", "0"])
def test_a_false_ci_variable_is_not_ci(run, pytester, monkeypatch, value):
    pytester.makepyfile(test_mixed=MIXED)
    monkeypatch.setenv("CI", value)

    result = run()

    result.assert_outcomes(passed=2, skipped=1)


def test_the_json_report_lists_tests_that_had_no_fence_and_why(run, pytester, monkeypatch):
    pytester.makepyfile(test_mixed=MIXED)

    result = run("--depfence-report=report.json")

    result.assert_outcomes(passed=2, skipped=1)
    report = json.loads((pytester.path / "report.json").read_text())
    [entry] = report["tests"]
    assert (entry["test_id"], entry["outcome"], entry["runs"]) == (
        "test_mixed.py::test_fenced",
        "skipped",
        [],
    )
    [note] = entry["notes"]
    assert note.startswith(UNAVAILABLE.format(reason="bcc is not installed"))


def test_require_false_in_ini_still_skips(run, pytester):
    pytester.makepyfile(test_mixed=MIXED)
    pytester.makeini("[pytest]\ndepfence_require = false\n")

    result = run()

    result.assert_outcomes(passed=2, skipped=1)


# --- the report header ------------------------------------------------------------------


def depfence_header(result: pytest.RunResult) -> list[str]:
    return [line for line in result.stdout.lines if line.startswith("depfence:")]


def test_header_names_the_reason_when_bcc_is_hidden(run, pytester):
    pytester.makepyfile(test_plain="def test_plain(): pass")

    result = run("--depfence-upstream", "127.0.0.1:5353")

    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [NO_BCC, "depfence: fenced tests are skipped; upstream 127.0.0.1:5353"]
    )
    assert len(depfence_header(result)) == 2


@pytest.fixture
def machine_line() -> str:
    """What the header's machine part reads on this machine (kernel, cgroup2, bcc)."""
    from pytest_depfence.kernel import preflight

    try:
        preflight()
    except FenceUnavailable as exc:
        pytest.skip(f"needs a machine that can build a fence: {exc}")
    return (
        f"depfence: kernel {lit(platform.release())}, cgroup2 at {lit(str(cgroup2_mount()))}, bcc *"
    )


def test_header_is_one_line_with_machine_and_upstream(run, pytester, machine_line):
    pytester.makepyfile(test_plain="def test_plain(): pass")

    # lab=True only so that bcc stays visible; nothing here builds a fence.
    result = run("--depfence-upstream", "127.0.0.1:5353", lab=True)

    result.assert_outcomes(passed=1)
    assert depfence_header(result) == [
        line for line in result.stdout.lines if line.startswith("depfence: kernel")
    ]
    result.stdout.fnmatch_lines([f"{machine_line}, upstream 127.0.0.1:5353"])


def test_header_names_the_lab_upstream(run, pytester, machine_line):
    pytester.makepyfile(test_plain="def test_plain(): pass")

    result = run(lab=True)

    result.assert_outcomes(passed=1)
    assert len(depfence_header(result)) == 1
    result.stdout.fnmatch_lines([f"{machine_line}, upstream *:53 (lab)"])


def test_header_names_the_ini_upstream(run, pytester):
    pytester.makepyfile(test_plain="def test_plain(): pass")
    pytester.makeini("[pytest]\ndepfence_upstream = [::1]:5300\n")

    result = run()

    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["depfence: fenced tests are skipped; upstream [[]::1[]]:5300"])


@pytest.mark.parametrize("require", [False, True], ids=["skip", "require"])
def test_cgroup_failure_after_loading_is_a_reason_too(lab_run, pytester, require):
    # bcc loads fine here; only creating the fence's cgroups fails (as on a read-only cgroupfs).
    pytester.makeconftest(
        """
        import pytest
        from pytest_depfence.cgroup import CgroupTree
        from pytest_depfence.errors import FenceUnavailable

        @pytest.fixture(autouse=True)
        def cgroups_out_of_reach(monkeypatch):
            def ensure(self):
                raise FenceUnavailable("cannot create fence cgroups under /nowhere: EROFS")
            monkeypatch.setattr(CgroupTree, "ensure", ensure)
        """
    )
    pytester.makepyfile(test_mixed=MIXED)

    result = lab_run("-rs", *(["--depfence-require"] if require else []))

    reason = lit(UNAVAILABLE.format(reason="cannot create fence cgroups under /nowhere: EROFS"))
    if require:
        result.assert_outcomes(passed=2, errors=1)
        result.stdout.fnmatch_lines(["*ERROR at setup of test_fenced*", reason])
    else:
        result.assert_outcomes(passed=2, skipped=1)
        result.stdout.fnmatch_lines([f"SKIPPED [[]1[]] test_mixed.py:*: {reason}"])
