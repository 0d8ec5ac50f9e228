"""The session report: every fenced run as JSON, GitHub annotations and a step summary.

One JSON document per session (`--depfence-report=PATH`), valid against
`report.schema.json` beside this module. Runs are plain dicts from the start,
so pytest-xdist can carry them from workers to the controller unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .events import EgressEvent, FenceResult
from .render import annotation_message, report_target

SCHEMA_PATH = Path(__file__).with_name("report.schema.json")
FORMAT = "pytest-depfence-report/1"


def event_record(event: EgressEvent) -> dict[str, Any]:
    record = dataclasses.asdict(event)
    record["ancestry"] = [{"pid": pid, "cmdline": cmdline} for pid, cmdline in event.ancestry]
    return record


def event_from_record(record: dict[str, Any]) -> EgressEvent:
    """The event an `event_record` was made from (runs travel as dicts, e.g. from xdist)."""
    ancestry = tuple((a["pid"], a["cmdline"]) for a in record["ancestry"])
    return EgressEvent(**{**record, "ancestry": ancestry})


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
    }


def write_run(
    path: str | Path, result: FenceResult, *, policy: str, mode: str, outage: str
) -> None:
    """`depfence run --json`: one run, as the session report holds it ($defs/run)."""
    record = run_record(result, policy=policy, mode=mode, outage=outage)
    Path(path).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


@dataclasses.dataclass
class TestRuns:
    """The fenced runs of one test, and how the test ended."""

    test_id: str
    path: str
    line: int | None
    outcome: str
    runs: list[dict[str, Any]]
    notes: list[str]


class SessionReport:
    """Everything fenced in a session, collected from reports (also xdist workers')."""

    def __init__(self) -> None:
        self.tests: list[TestRuns] = []

    def add(self, tests: TestRuns) -> None:
        self.tests.append(tests)

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
                for t in sorted(self.tests, key=lambda t: t.test_id)
            ],
        }

    def write(self, path: str | Path) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")

    def violations(self) -> Iterable[tuple[TestRuns, dict[str, Any], EgressEvent]]:
        for tests in sorted(self.tests, key=lambda t: t.test_id):
            for run in tests.runs:
                for violation in run["violations"]:
                    yield tests, run, event_from_record(violation)

    def github_annotations(self) -> list[str]:
        """`::error` (`::warning` when only audited) commands, one per violation, at the test."""
        lines = []
        for tests, run, v in self.violations():
            props = [f"file={_escape_property(tests.path)}"]
            if tests.line:
                props.append(f"line={tests.line}")
            props.append(f"title={_escape_property(f'depfence: {tests.test_id}')}")
            message = annotation_message(v, run["command"])
            # Audit mode recorded it without blocking: a warning, not an error.
            level = "warning" if v.verdict == "allowed" else "error"
            lines.append(f"::{level} {','.join(props)}::{_escape(message)}")
        return lines

    def step_summary(self) -> str:
        """A Markdown table for $GITHUB_STEP_SUMMARY: test, domain, command, verdict."""
        rows = [
            f"| `{_cell(tests.test_id)}` | `{_cell(report_target(v))}` "
            f"| `{_cell(v.cmdline or '?')}` | {v.verdict} |"
            for tests, _, v in self.violations()
        ]
        if not rows:
            fenced = sum(len(t.runs) for t in self.tests)
            return f"### depfence\n\nNo forbidden egress in {fenced} fenced run(s).\n"
        return "\n".join(
            [
                "### depfence: forbidden egress",
                "",
                "| test | domain | command | verdict |",
                "|---|---|---|---|",
                *rows,
                "",
            ]
        )


def _escape(text: str) -> str:
    # Workflow command data: %, CR and LF must be encoded.
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    # Workflow command properties: also ':' and ',' must be encoded.
    return _escape(text).replace(":", "%3A").replace(",", "%2C")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")
