"""The session report: every fenced run as JSON, GitHub annotations, a step summary, totals.

One JSON document per session (`--depfence-report=PATH`), valid against
`report.schema.json` beside this module. Runs are plain dicts from the start,
so pytest-xdist can carry them from workers to the controller unchanged.

For GitHub Actions the report says what to act on and nothing else: an
annotation per destination of each failed test's forbidden egress (a passing
test's blocked egress was what it expected), and a step summary whose first
line counts what became of every fenced test, including those that could not
build a fence.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .contract import program_of
from .events import EgressEvent, FenceResult
from .limits import Usage
from .options import LIMIT_OPTIONS
from .render import attempts, report_target, verdict_word

SCHEMA_PATH = Path(__file__).with_name("report.schema.json")
FORMAT = "pytest-depfence-report/1"


def event_record(event: EgressEvent) -> dict[str, Any]:
    record = dataclasses.asdict(event)
    for chain in ("ancestry", "called_by"):
        record[chain] = [{"pid": pid, "cmdline": cmdline} for pid, cmdline in getattr(event, chain)]
    return record


def event_from_record(record: dict[str, Any]) -> EgressEvent:
    """The event an `event_record` was made from (runs travel as dicts, e.g. from xdist)."""
    chains = {
        chain: tuple((a["pid"], a["cmdline"]) for a in record.get(chain, ()))
        for chain in ("ancestry", "called_by")
    }
    return EgressEvent(**{**record, **chains})


def run_record(result: FenceResult, *, policy: str, mode: str, outage: str) -> dict[str, Any]:
    """One fenced run, JSON-ready."""
    return {
        "command": result.command,
        "policy": policy,
        "mode": mode,
        "outage": outage,
        "returncode": result.returncode,
        "timed_out": result.timed_out,
        "duration": round(result.duration, 6),
        "domains": result.domains,
        "events": [event_record(e) for e in result.events],
        "violations": [event_record(e) for e in result.violations],
        "usage": usage_record(result.usage),
    }


def usage_record(usage: Usage) -> dict[str, Any]:
    """What a run used and the limits it had and hit, JSON-ready."""
    return {
        "limits": {name: getattr(usage.limits, name) for name in LIMIT_OPTIONS},
        "cpu_seconds": None if usage.cpu_seconds is None else round(usage.cpu_seconds, 6),
        "peak_memory": usage.peak_memory,
        "oom_kills": usage.oom_kills,
        "oom_victims": [{"pid": pid, "cmdline": cmdline} for pid, cmdline in usage.oom_victims],
        "forks_refused": usage.forks_refused,
    }


def write_run(
    path: str | Path, result: FenceResult, *, policy: str, mode: str, outage: str
) -> None:
    """`depfence run --json`: one run, as the session report holds it ($defs/run)."""
    record = run_record(result, policy=policy, mode=mode, outage=outage)
    Path(path).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


#: Tests import these texts, so the GitHub output and its tests cannot drift.
HEADLINE = (
    "{tests}: {egress} failed on forbidden egress, {contracts}, "
    "{unavailable} could not build a fence{reasons}"
)
#: The last annotation of a level when there were more than GitHub shows.
MORE = "{count} more in the step summary"
#: GitHub shows at most 10 annotations of each level per step; the 10th says how many more.
ANNOTATION_CAP = 10
#: Only this many command lines are listed in one annotation.
COMMANDS_SHOWN = 5

# What became of a fenced test, as the step summary and the JUnit totals count it.
EGRESS, CONTRACT, UNAVAILABLE = "egress", "contract", "unavailable"
XFAILED, PASSED, OTHER, SKIPPED = "xfailed", "passed", "other", "skipped"


@dataclasses.dataclass
class TestRuns:
    """The fenced runs of one test, and how the test ended.

    The fields after `notes` are not in the JSON report (its schema is fixed);
    the GitHub output needs them.
    """

    test_id: str
    path: str
    line: int | None
    outcome: str
    runs: list[dict[str, Any]]
    notes: list[str]
    #: The line of the `fenced.run` call of each run (None: not called from the test file).
    run_lines: list[int | None] = dataclasses.field(default_factory=list)
    xfailed: bool = False
    #: The ContractError message of a test that failed on its contract.
    contract_failure: str | None = None
    #: Why no fence could be built for the test (it has no runs).
    unavailable: str | None = None

    @property
    def kind(self) -> str:
        if self.unavailable is not None:
            return UNAVAILABLE
        if self.contract_failure is not None:
            return CONTRACT
        if self.outcome == "failed":
            return EGRESS if any(run["violations"] for run in self.runs) else OTHER
        if self.xfailed:
            return XFAILED
        return PASSED if self.outcome == "passed" else SKIPPED

    def audited(self) -> bool:
        """Whether a run in audit mode recorded forbidden egress (the test may still pass)."""
        return any(run["mode"] == "audit" and run["violations"] for run in self.runs)

    def run_line(self, index: int) -> int | None:
        """Where the run was started, else where the test is."""
        line = self.run_lines[index] if index < len(self.run_lines) else None
        return line if line is not None else self.line


@dataclasses.dataclass
class Finding:
    """The forbidden egress of one test to one destination (a DNS name, else an endpoint)."""

    tests: TestRuns
    destination: str
    line: int | None
    events: list[EgressEvent] = dataclasses.field(default_factory=list)
    commands: list[str] = dataclasses.field(default_factory=list)

    def message(self) -> str:
        """`github.com: 3 attempts by curl, wget (blocked at dns)`, then each command line
        and what it reached, then the runs. Attempts are counted as the terminal counts
        them (`render.attempts`); a process moved out of its fence is an escape."""
        count = len(attempts(self.events))
        programs = ", ".join(sorted({program_of(e.cmdline) for e in self.events}))
        how = "; ".join(sorted({_how(e) for e in self.events}))
        noun = "escape" if all(e.is_escape for e in self.events) else "attempt"
        lines = [f"{self.destination}: {count} {noun}{_s(count)} by {programs} ({how})"]
        asked: dict[str, list[EgressEvent]] = {}
        for e in self.events:
            who = e.cmdline or f"(unattributed: {e.unattributed or 'unknown'})"
            asked.setdefault(who, []).append(e)
        for who, events in list(asked.items())[:COMMANDS_SHOWN]:
            lines.append(f"  {who}: {reached(events)}")
        if len(asked) > COMMANDS_SHOWN:
            lines.append(f"  and {len(asked) - COMMANDS_SHOWN} more command lines")
        lines.append(f"while running {'; '.join(self.commands)}")
        return "\n".join(lines)


def reached(events: list[EgressEvent]) -> str:
    """What events reached, each once: a name's lookups as one (`github.com (A, AAAA)`),
    then endpoints and escapes as `report_target` says them."""
    lookups: dict[str, list[str]] = {}
    others: list[str] = []
    for e in events:
        if e.address is None and e.qtype and not e.is_escape:
            qtypes = lookups.setdefault(str(e.domain), [])
            if e.qtype not in qtypes:
                qtypes.append(e.qtype)
        elif report_target(e) not in others:
            others.append(report_target(e))
    names = [f"{name} ({', '.join(qtypes)})" for name, qtypes in lookups.items()]
    return ", ".join(names + others)


def findings(tests: TestRuns, *, mode: str | None = None) -> list[Finding]:
    """The test's forbidden egress, one Finding per destination (of runs in `mode`, if given)."""
    found: dict[str, Finding] = {}
    for index, run in enumerate(tests.runs):
        if mode is not None and run["mode"] != mode:
            continue
        for record in run["violations"]:
            event = event_from_record(record)
            key = _destination(event)
            finding = found.setdefault(key, Finding(tests, key, tests.run_line(index)))
            finding.events.append(event)
            if run["command"] not in finding.commands:
                finding.commands.append(run["command"])
    return sorted(found.values(), key=lambda f: f.destination)


def _destination(event: EgressEvent) -> str:
    # A name groups its A/AAAA queries and the connections to its addresses.
    if event.domain and not event.is_escape:
        return event.domain
    return report_target(event)


def _how(event: EgressEvent) -> str:
    word = verdict_word(event).lower()
    return f"{word} at {event.blocked_at}" if event.verdict == "blocked" else word


@dataclasses.dataclass(frozen=True)
class Annotation:
    """One GitHub workflow command: `::error file=...,line=...,title=...::message`."""

    level: str
    message: str
    title: str
    path: str | None = None
    line: int | None = None

    def render(self) -> str:
        props = [f"file={_escape_property(self.path)}"] if self.path else []
        if self.path and self.line:
            props.append(f"line={self.line}")
        props.append(f"title={_escape_property(self.title)}")
        return f"::{self.level} {','.join(props)}::{_escape(self.message)}"


class SessionReport:
    """Everything fenced in a session, collected from reports (also xdist workers')."""

    def __init__(self) -> None:
        self.tests: list[TestRuns] = []

    def add(self, tests: TestRuns) -> None:
        self.tests.append(tests)

    def ordered(self) -> list[TestRuns]:
        return sorted(self.tests, key=lambda t: t.test_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "tests": [
                {
                    "test_id": t.test_id,
                    "path": t.path,
                    "line": t.line,
                    "outcome": t.outcome,
                    "runs": t.runs,
                    "notes": t.notes,
                }
                for t in self.ordered()
            ],
        }

    def write(self, path: str | Path) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")

    def violations(self) -> Iterable[tuple[TestRuns, dict[str, Any], EgressEvent]]:
        for tests in self.ordered():
            for run in tests.runs:
                for violation in run["violations"]:
                    yield tests, run, event_from_record(violation)

    def count(self, kind: str) -> int:
        return sum(1 for t in self.tests if t.kind == kind)

    def totals(self) -> dict[str, str]:
        """Session totals, as JUnit `<testsuite>` properties (valid in every junit_family)."""
        runs = [run for t in self.tests for run in t.runs]
        return {
            "depfence_tests": str(len(self.tests)),
            "depfence_egress_failures": str(self.count(EGRESS)),
            "depfence_contract_failures": str(self.count(CONTRACT)),
            "depfence_unavailable": str(self.count(UNAVAILABLE)),
            "depfence_violations": str(sum(len(run["violations"]) for run in runs)),
            "depfence_domains": " ".join(sorted({d for run in runs for d in run["domains"]})),
        }

    def github_annotations(
        self, rootdir: str | Path | None = None, workspace: str | Path | None = None
    ) -> list[str]:
        """Workflow commands for what needs acting on, at most ANNOTATION_CAP per level.

        `::error` for each destination of a failed test's forbidden egress (at
        the line of its `fenced.run`), for each contract failure and, once, for
        fenced tests that failed because no fence could be built; `::notice` for
        each destination of an xfailed test and of audit findings. Passing tests
        get none: their blocked egress was what they expected. Paths are
        relative to `workspace` (GITHUB_WORKSPACE) when the file is in it.
        """
        errors: list[Annotation] = []
        notices: list[Annotation] = []
        for tests in self.ordered():
            path = _shown_path(tests.path, rootdir, workspace)
            kind = tests.kind
            if kind == EGRESS:
                errors += [_finding_annotation("error", f, path) for f in findings(tests)]
                continue
            if kind == XFAILED:
                notices += [_finding_annotation("notice", f, path) for f in findings(tests)]
                continue
            if kind == CONTRACT:
                line = tests.run_line(0) if tests.runs else tests.line
                title = f"depfence contract: {tests.test_id}"
                errors.append(Annotation("error", tests.contract_failure or "", title, path, line))
            found = findings(tests, mode="audit")
            notices += [_finding_annotation("notice", f, path) for f in found]
        errors += self._unavailable_annotation()
        return [a.render() for a in [*_capped(errors), *_capped(notices)]]

    def _unavailable_annotation(self) -> list[Annotation]:
        failed = [t for t in self.tests if t.kind == UNAVAILABLE and t.outcome == "failed"]
        if not failed:
            return []
        count = len(failed)
        message = f"{count} fenced test{_s(count)} failed: {self._reasons()}"
        return [Annotation("error", message, "depfence: the fence cannot be built")]

    def _reasons(self) -> str:
        reasons = [t.unavailable for t in self.ordered() if t.unavailable is not None]
        return "; ".join(dict.fromkeys(reason.splitlines()[0] for reason in reasons if reason))

    def headline(self) -> str:
        """The summary's first sentence: how many fenced tests, and what became of them."""
        unavailable = self.count(UNAVAILABLE)
        return HEADLINE.format(
            tests=_plural(len(self.tests), "fenced test"),
            egress=self.count(EGRESS),
            contracts=_plural(self.count(CONTRACT), "contract failure"),
            unavailable=unavailable,
            reasons=f" ({self._reasons()})" if unavailable else "",
        )

    def rest(self) -> str:
        """The sentence after the headline: the other fenced tests ("" when there are none)."""
        others = [
            f"{self.count(kind)} {word}"
            for kind, word in ((PASSED, "passed"), (XFAILED, "xfailed"), (SKIPPED, "skipped"))
            if self.count(kind)
        ]
        if self.count(OTHER):
            others.append(f"{self.count(OTHER)} failed for another reason")
        audited = sum(1 for t in self.tests if t.kind not in (EGRESS, XFAILED) and t.audited())
        if audited:
            others.append(f"audit findings in {_plural(audited, 'test')}")
        return f"Also: {', '.join(others)}." if others else ""

    def step_summary(self) -> str:
        """Markdown for $GITHUB_STEP_SUMMARY ("" when nothing was fenced): the headline,
        then forbidden egress of failed tests, tests that could not run, contract
        failures, audit findings and xfailed tests."""
        if not self.tests:
            return ""
        ordered = self.ordered()
        first = f"**{_cell(self.headline())}.** {_cell(self.rest())}".rstrip()
        parts = ["### depfence", "", first, ""]
        failed = [f for t in ordered if t.kind == EGRESS for f in findings(t)]
        parts += _egress_table("Forbidden egress (failed tests)", failed)
        parts += _unavailable_table([t for t in ordered if t.kind == UNAVAILABLE])
        parts += _contract_failures([t for t in ordered if t.kind == CONTRACT])
        audited = [
            f for t in ordered if t.kind not in (EGRESS, XFAILED) for f in findings(t, mode="audit")
        ]
        parts += _egress_table("Audit findings (recorded, not blocked)", audited)
        xfailed = [f for t in ordered if t.kind == XFAILED for f in findings(t)]
        parts += _egress_table("Expected failures (xfail)", xfailed)
        return "\n".join(parts)


def _finding_annotation(level: str, finding: Finding, path: str) -> Annotation:
    tests = finding.tests
    prefix = {EGRESS: "depfence", XFAILED: "depfence xfail"}.get(tests.kind, "depfence audit")
    title = f"{prefix}: {tests.test_id}"
    return Annotation(level, finding.message(), title, path, finding.line)


def _capped(annotations: list[Annotation]) -> list[Annotation]:
    """At most ANNOTATION_CAP: GitHub drops the rest, so the last one says how many more."""
    if len(annotations) <= ANNOTATION_CAP:
        return annotations
    shown = annotations[: ANNOTATION_CAP - 1]
    more = MORE.format(count=len(annotations) - len(shown))
    return [*shown, Annotation(shown[0].level, more, "depfence")]


def _shown_path(path: str, rootdir: str | Path | None, workspace: str | Path | None) -> str:
    """The test file relative to the workspace when it is in it, else as pytest shows it."""
    if rootdir is None or not workspace:
        return path
    full = os.path.normpath(os.path.join(rootdir, path))
    for base, target in ((workspace, full), (os.path.realpath(workspace), os.path.realpath(full))):
        relative = os.path.relpath(target, base)
        if relative != ".." and not relative.startswith(".." + os.sep):
            return relative
    return path


def _egress_table(title: str, found: list[Finding]) -> list[str]:
    """One row per attempt (test, destination, command line, verdict: blocked, audited,
    forbidden); the same attempt again (another process, another run) is `blocked ×2`."""
    if not found:
        return []
    counts: dict[tuple[str, str, str, str], int] = {}
    for finding in found:
        for attempt in attempts(finding.events):
            first = attempt[0]
            verdict = verdict_word(first).lower()
            key = (finding.tests.test_id, reached(attempt), first.cmdline or "?", verdict)
            counts[key] = counts.get(key, 0) + 1
    rows = [
        f"| `{_cell(test)}` | `{_cell(target)}` | `{_cell(command)}` "
        f"| {verdict}{f' ×{n}' if n > 1 else ''} |"
        for (test, target, command, verdict), n in counts.items()
    ]
    header = [
        f"#### {title}",
        "",
        "| test | destination | command | verdict |",
        "|---|---|---|---|",
    ]
    return [*header, *rows, ""]


def _unavailable_table(tests: list[TestRuns]) -> list[str]:
    if not tests:
        return []
    rows = [
        f"| `{_cell(t.test_id)}` | {t.outcome} | `{_cell(t.unavailable or '')}` |" for t in tests
    ]
    header = ["#### Could not run (no fence)", "", "| test | outcome | reason |", "|---|---|---|"]
    return [*header, *rows, ""]


def _contract_failures(tests: list[TestRuns]) -> list[str]:
    lines = ["#### Contract failures", ""] if tests else []
    for t in tests:
        text = (t.contract_failure or "").replace("```", "'''")
        lines += [f"`{_cell(t.test_id)}`", "", "```text", text, "```", ""]
    return lines


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{_s(count)}"


def _s(count: int) -> str:
    return "" if count == 1 else "s"


def _escape(text: str) -> str:
    # Workflow command data: %, CR and LF must be encoded.
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    # Workflow command properties: also ':' and ',' must be encoded.
    return _escape(text).replace(":", "%3A").replace(",", "%2C")


def _cell(text: str) -> str:
    # A Markdown table cell on one line; a '|' would end the cell, a '`' the code span.
    text = " ".join(text.splitlines())
    return text.replace("|", "\\|").replace("`", "'")
