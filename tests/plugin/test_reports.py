"""The session's reports: JSON (against its schema), JUnit properties, GitHub output, xdist.

Inner sessions run in the lab with a violating test, a clean one and one
without a fence; the outer test reads what they wrote.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
from plugin_helpers import line_of
from report_helpers import (
    by_test_id,
    junit_properties,
    read_report,
    schema_validator,
    violations,
)

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


def test_junit_xml_has_violation_count_and_domains(lab_run, pytester):
    pytester.makepyfile(test_session=SESSION)
    junit, report = pytester.path / "junit.xml", pytester.path / "report.json"

    result = lab_run(f"--junitxml={junit}", f"--depfence-report={report}")

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


def github_session(param_id: str) -> str:
    return f"""
import pytest

@pytest.mark.no_egress("github.com")
@pytest.mark.parametrize("host", ["github.com"], ids=[{param_id!r}])
def test_blocked(fenced, host):
    fenced.run(["getent", "hosts", host])

@pytest.mark.no_egress("github.com")
def test_clean(fenced):
    fenced.run({CLEAN.split()!r})
"""


#: The id has ':' and ',' to show that the annotation's properties escape them.
GITHUB_SESSION = github_session("a,b:c")
GITHUB_TEST_ID = "test_github.py::test_blocked[a,b:c]"
EARLIER = "## an earlier step's summary\n\nkept as it was\n"


def test_github_actions_annotations_and_step_summary(lab_run, pytester, monkeypatch):
    pytester.makepyfile(test_github=GITHUB_SESSION)
    summary, report = pytester.path / "summary.md", pytester.path / "report.json"
    summary.write_text(EARLIER)
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))

    result = lab_run(f"--depfence-report={report}")

    result.assert_outcomes(failed=1, passed=1)
    test = by_test_id(read_report(report))[GITHUB_TEST_ID]
    found = violations(test)
    assert found and {v["domain"] for v in found} == {"github.com"}
    annotations = [line for line in result.stdout.lines if line.startswith("::error ")]
    assert len(annotations) == len(found), "one annotation per violation"
    title = "depfence%3A test_github.py%3A%3Atest_blocked[a%2Cb%3Ac]"
    for line in annotations:
        match = re.fullmatch(r"::error (?P<props>.*?)::(?P<message>.*)", line)
        assert match, line
        assert match["props"] == f"file=test_github.py,line={test['line']},title={title}"
        assert re.fullmatch(
            rf"github\.com \((A|AAAA)\) blocked at dns: {BLOCKED} \(while running {BLOCKED}\)",
            match["message"],
        ), match["message"]
    rows = [
        f"| `{GITHUB_TEST_ID}` | `github.com ({v['qtype']})` | `{BLOCKED}` | blocked |"
        for v in found
    ]
    text = summary.read_text()
    assert text.startswith(EARLIER), "the summary must be appended to, not replaced"
    table = text[len(EARLIER) :].splitlines()
    assert "| test | domain | command | verdict |" in table
    assert sorted(line for line in table if line.startswith("| `")) == sorted(rows)


def table_cells(row: str) -> list[str]:
    """A Markdown table row's cells; `\\|` is a '|' inside a cell."""
    return re.split(r"(?<!\\)\|", row.strip().removeprefix("|").removesuffix("|"))


def test_step_summary_rows_keep_four_cells_whatever_the_test_id(lab_run, pytester, monkeypatch):
    pytester.makepyfile(test_github=github_session("a|b"))
    summary = pytester.path / "summary.md"
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))

    result = lab_run()

    result.assert_outcomes(failed=1, passed=1)
    rows = [line for line in summary.read_text().splitlines() if line.startswith("| `")]
    assert rows, "no violation in the summary"
    assert [len(table_cells(row)) for row in rows] == [4] * len(rows), rows


@pytest.mark.parametrize("value", [None, "false"])
def test_no_github_output_outside_github_actions(lab_run, pytester, monkeypatch, value):
    pytester.makepyfile(test_github=GITHUB_SESSION)
    summary = pytester.path / "summary.md"
    summary.write_text(EARLIER)
    if value is not None:
        monkeypatch.setenv("GITHUB_ACTIONS", value)
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))

    result = lab_run()

    result.assert_outcomes(failed=1, passed=1)  # there was a violation to annotate
    result.stdout.no_fnmatch_line("::error*")
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
    report = pytester.path / "report.json"

    result = lab_run("-n", "2", f"--depfence-report={report}")

    result.assert_outcomes(failed=len(XDIST_HOSTS))
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
