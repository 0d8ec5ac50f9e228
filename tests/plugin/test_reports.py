"""The session's reports: JSON (against its schema), JUnit XML (against an xunit2 schema),
GitHub annotations and step summary, xdist.

Inner sessions run in the lab (or, for a fence that cannot be built, without
bcc); the outer test reads what they wrote.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
from plugin_helpers import line_of
from report_helpers import (
    by_test_id,
    junit_errors,
    junit_properties,
    junit_suite_properties,
    read_report,
    schema_validator,
    violations,
    workflow_commands,
)

from pytest_depfence.contract import CONTRACTS_DIR, SUFFIX
from pytest_depfence.plugin import UNAVAILABLE
from pytest_depfence.plugin.results import REGENERATE
from pytest_depfence.report import ANNOTATION_CAP, MORE

BLOCKED = "getent hosts github.com"
CLEAN = "getent hosts mirror.internal"
POLICY = 'no_egress("github.com")'

SESSION = f"""
import pytest

@pytest.mark.no_egress("github.com")
def test_blocked(fenced):
    fenced.run({CLEAN.split()!r})
    fenced.run({BLOCKED.split()!r})

@pytest.mark.no_egress("github.com")
def test_clean(fenced):
    result = fenced.run({CLEAN.split()!r})
    assert result.returncode == 0

def test_unfenced():
    pass
"""


def assert_session_report(report: dict, path) -> None:
    """What SESSION leaves in the report: both fenced tests, every run, every violation."""
    tests = by_test_id(report)
    assert sorted(tests) == ["test_session.py::test_blocked", "test_session.py::test_clean"]
    blocked, clean = tests["test_session.py::test_blocked"], tests["test_session.py::test_clean"]
    assert (blocked["outcome"], clean["outcome"]) == ("failed", "passed")
    for name, test in (("test_blocked", blocked), ("test_clean", clean)):
        assert test["path"] == "test_session.py"
        # pytest's location of a decorated test: its first decorator.
        first, define = line_of(path, f"def {name}(") - 1, line_of(path, f"def {name}(")
        assert first <= test["line"] <= define
        for run in test["runs"]:
            assert (run["policy"], run["mode"], run["outage"]) == (POLICY, "block", "nxdomain")
            assert run["duration"] > 0
            assert [e for e in run["events"] if e["forbidden"]] == run["violations"]
    assert [r["command"] for r in blocked["runs"]] == [CLEAN, BLOCKED]
    assert [r["command"] for r in clean["runs"]] == [CLEAN]
    assert blocked["runs"][0]["violations"] == []
    assert blocked["runs"][0]["domains"] == ["mirror.internal"]
    found = blocked["runs"][1]["violations"]
    assert found, "the blocked lookup is not in the report"
    assert {(v["domain"], v["verdict"], v["blocked_at"]) for v in found} == {
        ("github.com", "blocked", "dns")
    }
    assert {v["cmdline"] for v in found} == {BLOCKED}
    assert {v["qtype"] for v in found} <= {"A", "AAAA"}
    assert violations(clean) == []
    assert clean["runs"][0]["events"], "the clean lookup is not in the report"


def test_json_report_matches_its_schema_and_has_every_run(lab_run, pytester):
    path = pytester.makepyfile(test_session=SESSION)
    target = pytester.path / "out" / "depfence.json"  # its directory does not exist yet

    result = lab_run(f"--depfence-report={target}")

    result.assert_outcomes(failed=1, passed=2)
    report = read_report(target)
    assert_session_report(report, path)
    # The schema really constrains the report: a run without violations is invalid.
    broken = copy.deepcopy(report)
    del broken["tests"][0]["runs"][0]["violations"]
    assert not schema_validator().is_valid(broken)


def test_json_report_path_from_the_ini_file(lab_run, pytester):
    pytester.makeini("[pytest]\ndepfence_report = ini-report.json\n")
    path = pytester.makepyfile(test_session=SESSION)

    result = lab_run()

    result.assert_outcomes(failed=1, passed=2)
    assert_session_report(read_report(pytester.path / "ini-report.json"), path)


def test_junit_xunit1_testcases_carry_violation_count_and_domains(lab_run, pytester):
    pytester.makepyfile(test_session=SESSION)
    junit, report = pytester.path / "junit.xml", pytester.path / "report.json"

    result = lab_run(
        "-o", "junit_family=xunit1", f"--junitxml={junit}", f"--depfence-report={report}"
    )

    result.assert_outcomes(failed=1, passed=2)
    cases = junit_properties(junit)
    tests = by_test_id(read_report(report))
    blocked = cases["test_blocked"]
    assert blocked["depfence_domains"] == "github.com mirror.internal"
    count = len(violations(tests["test_session.py::test_blocked"]))
    assert count > 0
    assert blocked["depfence_violations"] == str(count)
    assert cases["test_clean"] == {
        "depfence_violations": "0",
        "depfence_domains": "mirror.internal",
    }
    assert "depfence_violations" not in cases["test_unfenced"]
    assert junit_suite_properties(junit)["depfence_violations"] == str(count)
    # xunit1 is not xunit2: the schema really rejects <properties> in a <testcase>.
    assert any("properties" in error for error in junit_errors(junit))


#: The id has ':' and ',' to show that the annotation's properties escape them.
PARAM_ID = "a,b:c"
FAILING_ID = f"test_github.py::test_blocked[{PARAM_ID}]"
#: Title properties escape ':' and ','.
TITLE_ID = "test_github.py%3A%3Atest_blocked[a%2Cb%3Ac]"
CONTRACT = Path(CONTRACTS_DIR, f"deploy{SUFFIX}")
RUN_COMMENTS = ("blocked", "known", "audit", "contract")
EARLIER = "## an earlier step's summary\n\nkept as it was\n"


def github_session(pytester: pytest.Pytester, param_id: str = PARAM_ID) -> Path:
    """A failing test, an outage test that passes, a strict xfail, an audited test and a
    contract failure; each run on a line of its own, marked by a comment."""
    pytester.path.joinpath(CONTRACT).parent.mkdir()
    pytester.path.joinpath(CONTRACT).write_text('# depfence contract "deploy"\n')
    return pytester.makepyfile(
        test_github=f"""
import pytest

@pytest.mark.no_egress("github.com")
@pytest.mark.parametrize("host", ["github.com"], ids=[{param_id!r}])
def test_blocked(fenced, host):
    fenced.run({CLEAN.split()!r})  # clean
    fenced.run(["getent", "hosts", host])  # blocked

@pytest.mark.no_egress("github.com")
def test_outage(fenced):
    result = fenced.run({BLOCKED.split()!r}, check=False)  # outage
    assert result.returncode != 0 and result.violations

@pytest.mark.no_egress("github.com")
@pytest.mark.xfail(strict=True, reason="the deploy still needs github.com")
def test_known(fenced):
    fenced.run({BLOCKED.split()!r})  # known

@pytest.mark.no_egress("github.com")
@pytest.mark.fence(mode="audit")
def test_audit(fenced):
    fenced.run({BLOCKED.split()!r})  # audit

@pytest.mark.no_egress("github.com")
@pytest.mark.fence(contract="deploy")
def test_contract(fenced):
    fenced.run({CLEAN.split()!r})  # contract
"""
    )


def in_github_actions(pytester, monkeypatch, workspace: Path | None = None) -> Path:
    """GitHub's variables for the inner session; returns the step summary (one step before)."""
    summary = pytester.path / "summary.md"
    summary.write_text(EARLIER)
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    if workspace is not None:
        monkeypatch.setenv("GITHUB_WORKSPACE", str(workspace))
    return summary


def lookups(test: dict) -> str:
    """What one `getent hosts github.com` reached: `github.com (A, AAAA)`, in the order asked."""
    found = violations(test)
    assert found, f"{test['test_id']} reached nothing forbidden"
    assert {v["domain"] for v in found} == {"github.com"}
    return f"github.com ({', '.join(dict.fromkeys(v['qtype'] for v in found))})"


def finding(level: str, title: str, where: str, test: dict, how: str) -> str:
    """The annotation of a test's egress to github.com: one lookup (A and AAAA) is one
    attempt, by getent; which command line reached what; the run."""
    return (
        f"::{level} {where},title={title}::github.com: 1 attempt by getent ({how})"
        f"%0A  {BLOCKED}: {lookups(test)}%0Awhile running {BLOCKED}"
    )


def test_github_annotations_summary_and_junit_of_a_failing_session(lab_run, pytester, monkeypatch):
    path = github_session(pytester)
    summary = in_github_actions(pytester, monkeypatch, workspace=pytester.path.parent)
    report, junit = pytester.path / "report.json", pytester.path / "junit.xml"

    result = lab_run(f"--depfence-report={report}", f"--junitxml={junit}")

    result.assert_outcomes(failed=2, passed=2, xfailed=1)
    tests = by_test_id(read_report(report))
    shown = f"file={pytester.path.name}/test_github.py"  # relative to GITHUB_WORKSPACE
    # Each at the line of its fenced.run call, marked by a comment.
    at = {run: f"{shown},line={line_of(path, f'# {run}')}" for run in RUN_COMMENTS}
    contract_message = "%0A".join(
        [
            f"1 destination not in the contract {CONTRACT}:",
            "  mirror.internal",
            f"      contacted by: {CLEAN}",
            "If this is intended, update the contract: "
            + REGENERATE.format(nodeid="test_github.py::test_contract"),
        ]
    )
    assert workflow_commands(result) == [
        finding(
            "error", f"depfence%3A {TITLE_ID}", at["blocked"], tests[FAILING_ID], "blocked at dns"
        ),
        f"::error {at['contract']},title=depfence contract%3A test_github.py%3A%3Atest_contract::"
        + contract_message,
        finding(
            "notice",
            "depfence audit%3A test_github.py%3A%3Atest_audit",
            at["audit"],
            tests["test_github.py::test_audit"],
            "audited",
        ),
        finding(
            "notice",
            "depfence xfail%3A test_github.py%3A%3Atest_known",
            at["known"],
            tests["test_github.py::test_known"],
            "blocked at dns",
        ),
    ]  # nothing for test_outage: its egress was blocked, as it expected
    assert violations(tests["test_github.py::test_outage"]), "the outage test blocked nothing"

    assert_failing_summary(summary.read_text(), tests)
    assert_junit_totals(junit, tests)


def assert_failing_summary(text: str, tests: dict[str, dict]) -> None:
    """The headline counts every fenced test; then the failed, contract, audit, xfail parts."""
    assert text.startswith(EARLIER), "the summary must be appended to, not replaced"
    lines = text[len(EARLIER) :].splitlines()
    assert lines[:3] == [
        "### depfence",
        "",
        "**5 fenced tests: 1 failed on forbidden egress, 1 contract failure, "
        "0 could not build a fence.** Also: 2 passed, 1 xfailed, audit findings in 1 test.",
    ]
    sections = [line for line in lines if line.startswith("#### ")]
    assert sections == [
        "#### Forbidden egress (failed tests)",
        "#### Contract failures",
        "#### Audit findings (recorded, not blocked)",
        "#### Expected failures (xfail)",
    ]
    rows = {row for row in lines if row.startswith("| `")}
    for test_id, verdict in (
        (FAILING_ID, "blocked"),
        ("test_github.py::test_audit", "audited"),
        ("test_github.py::test_known", "blocked"),
    ):
        target = lookups(tests[test_id])
        assert f"| `{test_id}` | `{target}` | `{BLOCKED}` | {verdict} |" in rows
    assert "`test_github.py::test_contract`" in lines
    assert "  mirror.internal" in lines


def assert_junit_totals(junit: Path, tests: dict[str, dict]) -> None:
    """Valid xunit2 (pytest's default family): the session's totals on the <testsuite>."""
    assert junit_errors(junit) == []
    assert all(props == {} for props in junit_properties(junit).values())
    assert junit_suite_properties(junit) == {
        "depfence_tests": str(len(tests)),
        "depfence_egress_failures": "1",
        "depfence_contract_failures": "1",
        "depfence_unavailable": "0",
        "depfence_violations": str(sum(len(violations(t)) for t in tests.values())),
        "depfence_domains": "github.com mirror.internal",
    }


GREEN_SESSION = f"""
import pytest

@pytest.mark.no_egress("github.com")
def test_outage(fenced):
    result = fenced.run({BLOCKED.split()!r}, check=False)
    assert result.returncode != 0 and result.violations

@pytest.mark.no_egress("github.com")
def test_clean(fenced):
    fenced.run({CLEAN.split()!r})
"""


def test_a_green_session_has_no_annotations_and_a_one_line_summary(lab_run, pytester, monkeypatch):
    pytester.makepyfile(test_green=GREEN_SESSION)
    summary = in_github_actions(pytester, monkeypatch)

    result = lab_run()

    result.assert_outcomes(passed=2)
    assert workflow_commands(result) == []
    assert summary.read_text() == EARLIER + (
        "### depfence\n\n**2 fenced tests: 0 failed on forbidden egress, 0 contract failures, "
        "0 could not build a fence.** Also: 2 passed.\n"
    )


HOSTS = [f"host{n}.github.com" for n in range(1, 13)]
MANY_SESSION = f"""
import pytest

@pytest.mark.no_egress("github.com")
def test_many(fenced):
    fenced.run("for host in {" ".join(HOSTS)}; do getent hosts $host; done")
"""


def test_annotations_are_capped_and_the_last_says_how_many_more(lab_run, pytester, monkeypatch):
    path = pytester.makepyfile(test_many=MANY_SESSION)
    summary = in_github_actions(pytester, monkeypatch)

    result = lab_run()

    result.assert_outcomes(failed=1)
    commands = workflow_commands(result)
    assert len(commands) == ANNOTATION_CAP
    line = line_of(path, "fenced.run(")
    shown = sorted(HOSTS)[: ANNOTATION_CAP - 1]
    for command, host in zip(commands, shown):
        assert command.startswith(f"::error file=test_many.py,line={line},"), command
        assert f"::{host}: " in command, (host, command)
    more = len(HOSTS) - len(shown)
    assert commands[-1] == f"::error title=depfence::{MORE.format(count=more)}"
    rows = [cells for row in summary.read_text().splitlines() if (cells := table_cells(row))]
    assert {cells[1].strip().split()[0].strip("`") for cells in rows[2:]} == set(HOSTS)


UNBUILDABLE = """
import pytest

@pytest.mark.no_egress("github.com")
def test_fenced(fenced):
    fenced.run(["true"])

def test_unfenced():
    pass
"""


@pytest.mark.parametrize("required", [True, False], ids=["ci-fails", "opted-out-skips"])
def test_a_fence_that_cannot_be_built_is_in_the_summary_with_its_reason(
    run, pytester, monkeypatch, required
):
    pytester.makepyfile(test_unbuilt=UNBUILDABLE)
    summary = in_github_actions(pytester, monkeypatch)  # in CI: fail unless opted out
    junit = pytester.path / "junit.xml"

    result = run(
        "--depfence-report=report.json",
        f"--junitxml={junit}",
        *([] if required else ["--depfence-no-require"]),
    )

    result.assert_outcomes(passed=1, **({"errors": 1} if required else {"skipped": 1}))
    [test] = read_report(pytester.path / "report.json")["tests"]
    [note] = test["notes"]
    reason = note.removeprefix(UNAVAILABLE.format(reason=""))
    assert reason.startswith("bcc is not installed"), note
    outcome = "failed" if required else "skipped"
    lines = summary.read_text()[len(EARLIER) :].splitlines()
    assert lines[2] == (
        "**1 fenced test: 0 failed on forbidden egress, 0 contract failures, "
        f"1 could not build a fence ({reason}).**"
    )
    assert f"| `test_unbuilt.py::test_fenced` | {outcome} | `{reason}` |" in lines
    title = "depfence%3A the fence cannot be built"
    failed = [f"::error title={title}::1 fenced test failed: {reason}"]
    assert workflow_commands(result) == (failed if required else [])
    assert junit_errors(junit) == []
    assert junit_suite_properties(junit)["depfence_unavailable"] == "1"


def table_cells(row: str) -> list[str]:
    """A Markdown table row's cells; `\\|` is a '|' inside a cell ([] for other lines)."""
    if not row.startswith("|"):
        return []
    return re.split(r"(?<!\\)\|", row.strip().removeprefix("|").removesuffix("|"))


def test_step_summary_rows_keep_four_cells_whatever_the_test_id(lab_run, pytester, monkeypatch):
    github_session(pytester, "a|b")
    summary = in_github_actions(pytester, monkeypatch)

    result = lab_run()

    result.assert_outcomes(failed=2, passed=2, xfailed=1)
    rows = [line for line in summary.read_text().splitlines() if line.startswith("| `")]
    rows = [row for row in rows if "test_blocked" in row]
    assert rows, "no violation in the summary"
    assert [len(table_cells(row)) for row in rows] == [4] * len(rows), rows


@pytest.mark.parametrize("value", [None, "false"])
def test_no_github_output_outside_github_actions(lab_run, pytester, monkeypatch, value):
    github_session(pytester)
    summary = pytester.path / "summary.md"
    summary.write_text(EARLIER)
    if value is not None:
        monkeypatch.setenv("GITHUB_ACTIONS", value)
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))

    result = lab_run()

    result.assert_outcomes(failed=2, passed=2, xfailed=1)  # there was egress to annotate
    assert workflow_commands(result) == []
    assert summary.read_text() == EARLIER


XDIST_HOSTS = [
    "github.com",
    "api.github.com",
    "objects.githubusercontent.com",
    "raw.githubusercontent.com",
]
XDIST_SESSION = f"""
import json
import pathlib
import pytest

@pytest.mark.no_egress("github.com", "*.githubusercontent.com")
@pytest.mark.parametrize("host", {XDIST_HOSTS!r})
def test_blocked(fenced, host, worker_id):
    result = fenced.run(["getent", "hosts", host], check=False)
    seen = sorted([v.domain, v.qtype, v.cmdline] for v in result.violations)
    pathlib.Path(f"seen-{{host}}.json").write_text(json.dumps([worker_id, seen]))
    assert result.violations == []
"""


def test_xdist_workers_results_are_merged_into_one_report(lab_run, pytester):
    pytester.makepyfile(test_spread=XDIST_SESSION)
    report, junit = pytester.path / "report.json", pytester.path / "junit.xml"

    result = lab_run("-n", "2", f"--depfence-report={report}", f"--junitxml={junit}")

    result.assert_outcomes(failed=len(XDIST_HOSTS))
    # The controller writes the JUnit totals (record_testsuite_property cannot, under xdist).
    assert junit_errors(junit) == []
    assert junit_suite_properties(junit)["depfence_egress_failures"] == str(len(XDIST_HOSTS))
    tests = by_test_id(read_report(report))
    assert sorted(tests) == sorted(f"test_spread.py::test_blocked[{h}]" for h in XDIST_HOSTS)
    workers = set()
    for host in XDIST_HOSTS:
        worker, seen = json.loads((pytester.path / f"seen-{host}.json").read_text())
        workers.add(worker)
        assert seen, f"{host} was not refused"
        in_report = sorted(
            [v["domain"], v["qtype"], v["cmdline"]]
            for v in violations(tests[f"test_spread.py::test_blocked[{host}]"])
        )
        assert in_report == seen, f"the report lost violations of the test for {host}"
    assert workers == {"gw0", "gw1"}, "the fenced tests did not run on both workers"
