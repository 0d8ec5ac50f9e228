"""After each fenced test: audit warnings, the contract, and the session's reports.

The runs of a test are recorded before anything that can raise, so the JSON
report, JUnit properties and GitHub annotations always have them; runs from
pytest-xdist workers travel to the controller as plain data on the report,
with the line of each run's `fenced.run` call and a contract failure's message.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import warnings
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ..errors import ContractError, EgressAuditWarning, ServiceViolation
from .settings import FENCE_KEY, FENCE_KWARGS_KEY, RUNS_KEY, SETTINGS_KEY

if TYPE_CHECKING:
    from types import FrameType

    from ..events import FenceResult
    from ..fence import Fence
    from ..report import SessionReport

#: The line in the test file of each run's `fenced.run` call (None: not called from it).
RUN_LINES_KEY = pytest.StashKey[list["int | None"]]()
#: JUnit families in which a <testcase> may hold <properties> (xunit2 forbids them).
TESTCASE_PROPERTIES = ("xunit1", "legacy")

#: The warning text for audited runs; tests import it.
AUDITED = "depfence audit (recorded, not blocked): {report}"
#: How to (re)write a test's contract, as failures and contract headers say it.
REGENERATE = "pytest --depfence-update-contracts {nodeid}"
#: Notes in the "depfence contracts" section and the JSON report.
CONTRACT_WRITTEN = "contract {path} {verb}"
CONTRACT_UNUSED = "contract {path}: {destination} is listed but was not contacted"
#: The terminal summary of a fenced test that had no policy: what it contacted, unjudged.
UNJUDGED = "{test_id}: no policy, so nothing was judged; it contacted {domains}"
#: How a run without any policy describes its policy (`Policy("no_egress", ()).describe()`).
NO_POLICY = "no_egress()"


def after_test(item: pytest.Item, passed: bool) -> None:
    """Stop the fence's services, check them and the contract (of a passing test), record
    the runs, then warn about audited ones.

    Recording comes before anything that can raise (a service that would not stop, a
    contract failure, an audit warning turned into an error), so the reports always
    have the test's runs; a failing test keeps its own exception.
    """
    __tracebackhide__ = True
    fence = item.stash.get(FENCE_KEY, None)
    if fence is None:
        return
    notes: list[str] = []
    failure: Exception | None = None
    try:
        fence.stop_services()  # the test is over: what they did outside runs is known now
    except Exception as exc:  # noqa: BLE001 - raised below, after the runs are recorded
        failure = exc
    if passed and failure is None:
        failure = _service_violations(fence)
    contract = item.stash.get(FENCE_KWARGS_KEY, {}).get("contract")
    if passed and failure is None and contract is not None:
        try:
            notes = _contract(item, fence, contract)
        except ContractError as exc:
            failure = exc
    _record(item, notes)
    _attach_output(item, fence)
    _warn_audited(item, fence)
    if failure is not None and passed:
        raise failure


def _service_violations(fence: Fence) -> ServiceViolation | None:
    """Forbidden egress of fenced services outside any run (start-up, between runs):
    no `run()` raised it, so the test fails with it (block mode)."""
    from ..render import format_violations

    if fence.mode != "block":
        return None
    texts, violations = [], []
    for service in fence.services:
        if service.result is not None and service.result.violations:
            texts.append(format_violations(service.result.violations, service.result.command))
            violations.extend(service.result.violations)
    return ServiceViolation("\n".join(texts), violations) if violations else None


def _attach_output(item: pytest.Item, fence: Fence) -> None:
    """Each fenced run's output, as report sections ("Captured fenced stdout call")."""
    for stream in ("stdout", "stderr"):
        parts = [
            f"$ {result.command}\n{text}"
            for result in fence.results
            if (text := getattr(result, stream))
        ]
        if parts:
            item.add_report_section("call", f"fenced {stream}", "\n".join(parts))


#: Failures the plugin raises after the test: their message is the whole story.
PLUGIN_FAILURES = (ContractError, EgressAuditWarning, ServiceViolation)


def plain_failure(report: pytest.TestReport, call: pytest.CallInfo[None]) -> None:
    """A contract failure, a service's violation outside any run, or an audit warning made
    an error, reads as its message alone, not as the plugin's source lines that raised it."""
    if call.excinfo is not None and call.excinfo.errisinstance(PLUGIN_FAILURES):
        report.longrepr = f"{call.excinfo.typename}: {call.excinfo.value}"


def _record(item: pytest.Item, notes: list[str]) -> None:
    """Leave the runs for the report (and JUnit), once per test."""
    from ..report import run_record

    fence = item.stash[FENCE_KEY]
    if RUNS_KEY in item.stash:
        return
    runs = [
        run_record(r, policy=fence.policy.describe(), mode=fence.mode, outage=fence.outage)
        for r in fence.results
    ]
    item.stash[RUNS_KEY] = (runs, notes)
    if _junit_family(item.config) not in TESTCASE_PROPERTIES:
        return  # the session totals are <testsuite> properties (Reporter)
    violations = sum(len(r.violations) for r in fence.results)
    domains = sorted({d for r in fence.results for d in r.domains})
    item.user_properties.append(("depfence_violations", str(violations)))
    item.user_properties.append(("depfence_domains", " ".join(domains)))


def _junit_family(config: pytest.Config) -> str | None:
    try:
        return str(config.getini("junit_family"))
    except ValueError:  # the junitxml plugin is disabled (-p no:junitxml)
        return None


def _watch_runs(item: pytest.Item, fence: Fence) -> None:
    """Note where in the test file each `fenced.run` was called, for the annotations."""
    lines: list[int | None] = []
    item.stash[RUN_LINES_KEY] = lines
    test_file = os.path.normcase(os.path.abspath(item.path))
    run = fence.run
    lock = threading.Lock()  # runs are serialized by the fence anyway; this pairs the lines

    @functools.wraps(run)
    def watched(*args: Any, **kwargs: Any) -> FenceResult:
        __tracebackhide__ = True
        line = _caller_line(test_file)
        with lock:
            before = len(fence.results)
            try:
                return run(*args, **kwargs)
            finally:
                lines.extend([line] * (len(fence.results) - before))

    fence.run = watched  # type: ignore[method-assign]


def _caller_line(test_file: str) -> int | None:
    """The line of the innermost frame in the test file, calling through helpers if any."""
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        if os.path.normcase(os.path.abspath(frame.f_code.co_filename)) == test_file:
            return frame.f_lineno
        frame = frame.f_back
    return None


def _warn_audited(item: pytest.Item, fence: Fence) -> None:
    """Audit mode: each run's forbidden egress, as one warning of its own class, at the test."""
    from ..render import format_violations

    if fence.mode != "audit":
        return
    path, line, _ = item.location
    for result in fence.results:
        audited = result.violations  # in audit mode: let through, or (an escape) killed
        if audited:
            text = AUDITED.format(report=format_violations(audited, result.command))
            warnings.warn_explicit(text, EgressAuditWarning, path, (line or 0) + 1)


def _contract(item: pytest.Item, fence: Fence, name: str) -> list[str]:
    """Check the test's egress against its contract (or write it); return notes for the report."""
    from ..contract import (
        Contract,
        compare,
        missing_text,
        new_destinations_text,
        path_for,
        write_contract,
    )

    path = path_for(item.path, name)
    shown = _shown(item.config, path)
    events = [e for r in fence.results for e in r.events]
    regenerate = REGENERATE.format(nodeid=item.nodeid)
    if item.config.stash[SETTINGS_KEY].update_contracts:
        text = Contract.from_events(events).render(name, regenerate)
        verb = write_contract(path, text)
        return [] if verb is None else [CONTRACT_WRITTEN.format(path=shown, verb=verb)]
    if not path.exists():
        raise ContractError(missing_text(shown, regenerate))
    comparison = compare(Contract.load(path), events)
    if comparison.new:
        raise ContractError(new_destinations_text(comparison, shown, regenerate))
    return [CONTRACT_UNUSED.format(path=shown, destination=dest) for dest in comparison.unused]


def _shown(config: pytest.Config, path: Path) -> Path:
    try:
        return path.relative_to(config.rootpath)
    except ValueError:
        return path


class Reporter:
    """Collects every fenced run (also from xdist workers) and writes the session's reports."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self._report: SessionReport | None = None
        self.notes: list[str] = []
        self.unjudged: list[str] = []
        self.worker = hasattr(config, "workerinput")

    @property
    def report(self) -> SessionReport:
        """Made at the first fenced test: a session without one never imports it."""
        if self._report is None:
            from ..report import SessionReport

            self._report = SessionReport()
        return self._report

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_call(self, item: pytest.Item) -> None:
        fence = item.stash.get(FENCE_KEY, None)
        if fence is not None:
            _watch_runs(item, fence)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        if call.when == "call" and RUN_LINES_KEY in item.stash:
            # Plain data, as the runs: pytest-xdist carries it to the controller.
            setattr(report, "depfence_run_lines", item.stash[RUN_LINES_KEY])  # noqa: B010
        if call.excinfo is not None and call.excinfo.errisinstance(ContractError):
            setattr(report, "depfence_contract", str(call.excinfo.value))  # noqa: B010
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.worker:
            return
        unavailable = getattr(report, "depfence_unavailable", None)
        runs = [] if unavailable else getattr(report, "depfence_runs", None)
        if runs is None:
            return
        from ..report import TestRuns

        path, line, _ = report.location
        if unavailable:
            notes = [unavailable]  # the report says why the test has no runs
        else:
            notes = list(getattr(report, "depfence_notes", []))
            self.notes.extend(notes)
            self._note_unjudged(report.nodeid, runs)
        self.report.add(
            TestRuns(
                test_id=report.nodeid,
                path=path,
                line=line + 1 if line is not None else None,
                outcome=report.outcome,
                runs=runs,
                notes=notes,
                run_lines=list(getattr(report, "depfence_run_lines", [])),
                xfailed=hasattr(report, "wasxfail") and report.outcome == "skipped",
                contract_failure=getattr(report, "depfence_contract", None),
                unavailable=_reason(unavailable) if unavailable else None,
            )
        )

    def _note_unjudged(self, test_id: str, runs: list[dict[str, Any]]) -> None:
        domains = sorted({d for run in runs if run["policy"] == NO_POLICY for d in run["domains"]})
        if domains:
            self.unjudged.append(UNJUDGED.format(test_id=test_id, domains=", ".join(domains)))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.worker:
            return
        if self.unjudged:
            terminalreporter.section("depfence: fenced tests without a policy")
            for line in self.unjudged:
                terminalreporter.write_line(line)
            terminalreporter.write_line(
                "(give them no_egress(...) or egress_only(...) to judge what they contact)"
            )
        if self.notes:
            terminalreporter.section("depfence contracts")
            for note in self.notes:
                terminalreporter.write_line(note)
        if os.environ.get("GITHUB_ACTIONS") == "true" and self._report is not None:
            workspace = os.environ.get("GITHUB_WORKSPACE")
            for line in self.report.github_annotations(self.config.rootpath, workspace):
                terminalreporter.write_line(line)

    @pytest.hookimpl(tryfirst=True)  # before junitxml writes its file
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        settings = self.config.stash.get(SETTINGS_KEY, None)
        if self.worker or settings is None:
            return
        if settings.report:
            self.report.write(settings.report)
        if self._report is None:
            return  # no fenced test: nothing to total or summarise
        if self.report.tests:
            _junit_totals(self.config, self.report.totals())
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        text = self.report.step_summary()
        if os.environ.get("GITHUB_ACTIONS") == "true" and summary and text:
            with open(summary, "a", encoding="utf-8") as f:
                f.write(text)


def _reason(unavailable: str) -> str:
    """The reason alone, without the "depfence: the fence cannot be built: " of the message."""
    from . import UNAVAILABLE

    prefix = UNAVAILABLE.format(reason="")
    return unavailable.removeprefix(prefix)


def _junit_totals(config: pytest.Config, totals: dict[str, str]) -> None:
    """Session totals as <testsuite> properties: what `record_testsuite_property` writes, but
    from the controller, where pytest-xdist workers' reports arrive (the fixture cannot)."""
    for plugin in config.pluginmanager.get_plugins():
        add = getattr(plugin, "add_global_property", None)
        if callable(add):  # junitxml's LogXML, registered only with --junitxml
            for name, value in totals.items():
                add(name, value)
