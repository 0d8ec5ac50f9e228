"""Audit mode: forbidden egress is recorded and warned about, never blocked (in the lab).

The deploy script reaches github.com under no_egress("github.com"). In block
mode it would be refused; in audit mode the script gets the lab's page, the
test passes on its own assertions, and the warning and the JSON report name
the domain and the command line of the process that asked (curl), not just
the script the test ran.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from plugin_helpers import line_of, lit
from report_helpers import (
    by_test_id,
    junit_suite_properties,
    read_report,
    violations,
    write_script,
)

from pytest_depfence.plugin import AUDITED
from pytest_depfence.render import VIOLATION_HEADLINE

SCRIPT = "./deploy.sh"
CURL = "curl -s http://github.com/"
TEST_ID = "test_deploy.py::test_deploy"
WARNING_OPTION = "error::pytest_depfence.EgressAuditWarning"


def deploy_test(fence_marker: str = "") -> str:
    return f"""
import pytest

@pytest.mark.no_egress("github.com")
{fence_marker}
def test_deploy(fenced):
    result = fenced.run(["{SCRIPT}"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == "lab:github.com\\n"
"""


@dataclass
class Scenario:
    fence_marker: str
    args: tuple[str, ...]
    ini: str | None


SCENARIOS = {
    "marker": Scenario('@pytest.mark.fence(mode="audit")', (), None),
    "cli": Scenario("", ("--depfence-mode=audit",), None),
    "ini": Scenario("", (), "[pytest]\ndepfence_mode = audit\n"),
}


@pytest.fixture
def deploy(pytester: pytest.Pytester) -> None:
    write_script(pytester.path / "deploy.sh", CURL)


def audited_headline() -> str:
    """The warning's first line as an fnmatch pattern, the count left open."""
    text = AUDITED.format(report=VIOLATION_HEADLINE.format(count="@", s="@", command=SCRIPT))
    return lit(text).replace("@", "*")


def assert_audited_in_report(test: dict) -> None:
    """The run is in the report as audited: forbidden, allowed, asked for by curl."""
    (run,) = test["runs"]
    assert (run["command"], run["mode"], run["returncode"]) == (SCRIPT, "audit", 0)
    assert run["policy"] == 'no_egress("github.com")'
    found = violations(test)
    assert found, "audit mode recorded no forbidden egress"
    assert {v["domain"] for v in found} == {"github.com"}
    assert {v["verdict"] for v in found} == {"allowed"}
    assert all(v["forbidden"] for v in found)
    assert {v["cmdline"] for v in found} == {CURL}
    assert [v for v in run["events"] if v["forbidden"]] == run["violations"]


@pytest.mark.parametrize("name", SCENARIOS)
def test_audit_mode_lets_the_script_through_and_warns(lab_run, pytester, deploy, name):
    scenario = SCENARIOS[name]
    if scenario.ini:
        pytester.makeini(scenario.ini)
    path = pytester.makepyfile(test_deploy=deploy_test(scenario.fence_marker))
    report = pytester.path / "report.json"

    result = lab_run("--depfence-report", str(report), *scenario.args)

    result.assert_outcomes(passed=1, warnings=1)
    marker = line_of(path, "@pytest.mark.no_egress")  # the test's first line
    rule = lit(f'rule no_egress("github.com") [marker at test_deploy.py:{marker}]')
    result.stdout.fnmatch_lines(
        [
            "*= warnings summary =*",
            TEST_ID,
            f"  test_deploy.py:{marker}: EgressAuditWarning: {audited_headline()}",
            f"    allowed  github.com (A*)*at -*{rule}",
            f"             pid [0-9]*  {CURL}",
        ]
    )
    (test,) = read_report(report)["tests"]
    assert (test["test_id"], test["outcome"]) == (TEST_ID, "passed")
    assert_audited_in_report(test)


def test_audit_warning_as_error_fails_the_test(lab_run, pytester, deploy):
    pytester.makepyfile(test_deploy=deploy_test())

    result = lab_run("--depfence-mode=audit", "-W", WARNING_OPTION, "-rf")

    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            f"EgressAuditWarning: {audited_headline()}",
            "  allowed  github.com (A*)*at -*",
            f"*pid [0-9]*  {CURL}",
            f"FAILED {TEST_ID} - EgressAuditWarning: *",  # the rest is cut to the width,
        ]
    )
    result.stdout.no_fnmatch_line("*def _warn_audited(*")  # no plugin source before it


def test_audit_warning_as_error_keeps_the_run_in_the_reports(lab_run, pytester, deploy):
    pytester.makepyfile(test_deploy=deploy_test())
    report = pytester.path / "report.json"
    junit = pytester.path / "junit.xml"

    result = lab_run(
        "--depfence-mode=audit",
        "-W",
        WARNING_OPTION,
        "--depfence-report",
        str(report),
        "--junitxml",
        str(junit),
    )

    result.assert_outcomes(failed=1)
    tests = by_test_id(read_report(report))
    assert list(tests) == [TEST_ID]
    assert tests[TEST_ID]["outcome"] == "failed"
    assert_audited_in_report(tests[TEST_ID])
    properties = junit_suite_properties(junit)  # the session's totals: this one test
    assert properties["depfence_domains"] == "github.com"
    assert int(properties["depfence_violations"]) == len(violations(tests[TEST_ID]))


def test_audit_warning_also_when_the_test_fails_on_its_own(lab_run, pytester, deploy):
    write_script(pytester.path / "deploy.sh", CURL, "exit 3")  # reaches github.com, then fails
    pytester.makepyfile(test_deploy=deploy_test('@pytest.mark.fence(mode="audit")'))

    result = lab_run()

    result.assert_outcomes(failed=1, warnings=1)
    result.stdout.fnmatch_lines(
        ["*= warnings summary =*", f"*EgressAuditWarning: {audited_headline()}"]
    )
