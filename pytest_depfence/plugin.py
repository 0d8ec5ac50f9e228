"""The pytest plugin: markers, options, the `fenced` fixture. The only module importing pytest.

Settings exist as marker, CLI flag and ini key; precedence is marker > CLI >
ini. Policies are parsed at collection time, so a bad pattern stops the run
before any test starts and names where it was written.
"""

from __future__ import annotations

import inspect
import os
import re
import warnings
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from .errors import (
    ConfigError,
    ContractError,
    DepfenceError,
    EgressAuditWarning,
    FenceUnavailable,
    PolicyError,
)

if TYPE_CHECKING:
    from .fence import Fence
    from .lab import Lab
    from .policy import Policy

#: Reason given when a fenced test cannot run; tests import it so text and tests agree.
UNAVAILABLE = "depfence: the fence cannot be built: {reason}"
MARKERS = {
    "no_egress": "no_egress(*patterns): fenced runs must not reach these names/addresses "
    "(github.com = it and every name below; *.github.com = names below only; CIDRs)",
    "egress_only": "egress_only(*patterns): fenced runs may reach only these names/addresses",
    "fence": "fence(mode='block'|'audit', outage='nxdomain'|'servfail'|'refused'|'timeout'"
    "|'reset'|'blackhole', timeout=SECONDS, contract=NAME): how the `fenced` fixture runs; "
    "contract pins the test's egress to depfence-contracts/NAME.contract beside the test file",
}
FENCE_MARKER_ARGS = ("mode", "outage", "timeout", "contract")
POLICY_KEY = pytest.StashKey["Policy"]()
FENCE_KWARGS_KEY = pytest.StashKey[dict[str, Any]]()
SETTINGS_KEY = pytest.StashKey["Settings"]()
LAB_KEY: pytest.StashKey[Lab] = pytest.StashKey()
FENCE_KEY: pytest.StashKey[Fence] = pytest.StashKey()
RUNS_KEY: pytest.StashKey[tuple[list[dict[str, Any]], list[str]]] = pytest.StashKey()
#: The warning text for audited runs; tests import it.
AUDITED = "depfence audit (recorded, not blocked): {report}"
#: How to (re)write a test's contract, as failures and contract headers say it.
REGENERATE = "pytest --depfence-update-contracts {nodeid}"
#: Notes in the "depfence contracts" section and the JSON report.
CONTRACT_WRITTEN = "contract {path} {verb}"
CONTRACT_UNUSED = "contract {path}: {destination} is listed but was not contacted"


@dataclass
class Settings:
    """Session-wide settings after CLI and ini were merged (CLI wins)."""

    upstream: str | None
    upstream_source: str
    policy: Policy | None
    mode: str
    require: bool
    lab: bool
    report: str | None
    update_contracts: bool


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("depfence", "dependency fence (pytest-depfence)")

    def option(flag: str, ini_type: str | None, help: str, **kwargs: Any) -> None:
        name = flag[2:].replace("-", "_")
        group.addoption(flag, dest=name, help=f"{help} (ini: {name})", **kwargs)
        parser.addini(name, help=help, type=ini_type, default=None)  # type: ignore[arg-type]

    option(
        "--depfence-upstream",
        "string",
        "DNS server the fence's proxy forwards allowed queries to, HOST[:PORT] "
        "(default: the lab's resolver with --depfence-lab, else the first nameserver "
        "of /etc/resolv.conf)",
        metavar="HOST[:PORT]",
    )
    option(
        "--depfence-no-egress",
        "linelist",
        "pattern fenced runs must not reach, for tests without a policy marker; repeatable",
        action="append",
        metavar="PATTERN",
    )
    option(
        "--depfence-egress-only",
        "linelist",
        "pattern fenced runs may reach (all else is blocked), for tests without a policy "
        "marker; repeatable",
        action="append",
        metavar="PATTERN",
    )
    option(
        "--depfence-mode",
        "string",
        "block (default) or audit (record forbidden egress without blocking it)",
        metavar="MODE",
    )
    option(
        "--depfence-require",
        "bool",
        "fail fenced tests when the fence cannot be built, instead of skipping them",
        action="store_true",
        default=None,
    )
    option(
        "--depfence-report",
        "string",
        "write one JSON report of every fenced run of the session to PATH "
        "(schema: pytest_depfence/report.schema.json)",
        metavar="PATH",
    )
    option(
        "--depfence-update-contracts",
        "bool",
        "write or rewrite the contracts of the tests that ran instead of checking them",
        action="store_true",
        default=None,
    )
    option(
        "--depfence-lab",
        "bool",
        "run the session inside the built-in test lab: a private network namespace with "
        "fake github.com, mirror.internal, ... and its own DNS server as upstream",
        action="store_true",
        default=None,
    )


def _setting(config: pytest.Config, name: str) -> tuple[Any, str]:
    """A value and where it came from: CLI flag over ini key; (None, '') when neither is set."""
    value = config.getoption(name)
    if value not in (None, []):
        return value, f"CLI flag --{name.replace('_', '-')}"
    try:
        value = config.getini(name)
    except ValueError as exc:
        # pytest's own conversion (a bool key set to "maybe") would be an INTERNALERROR.
        raise pytest.UsageError(f"depfence: ini key {name}: {exc}") from None
    if value not in (None, [], ""):
        return value, f"ini key {name}"
    return None, ""


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _configured_policy(config: pytest.Config) -> Policy | None:
    """The session's default policy: CLI flags, else ini keys; one kind per level."""
    from .policy import Policy

    levels = (
        ("CLI flag --depfence-no-egress", "CLI flag --depfence-egress-only", config.getoption),
        ("ini key depfence_no_egress", "ini key depfence_egress_only", config.getini),
    )
    for ne_source, eo_source, get in levels:
        no_egress = get("depfence_no_egress")
        egress_only = get("depfence_egress_only")
        if no_egress and egress_only:
            raise pytest.UsageError(
                f"depfence: both {ne_source} and {eo_source} are set; choose one policy kind"
            )
        if no_egress:
            return Policy.no_egress(*no_egress, source=ne_source)
        if egress_only:
            return Policy.egress_only(*egress_only, source=eo_source)
    return None


def pytest_configure(config: pytest.Config) -> None:
    for text in MARKERS.values():
        config.addinivalue_line("markers", text)
    config.pluginmanager.register(Reporter(config), "depfence-reporter")


def _load_settings(config: pytest.Config) -> Settings:
    """Merge and check CLI flags and ini keys; a bad value is a usage error naming its source.

    Runs at session start rather than in pytest_configure, so that `pytest --help`
    and `pytest --markers` still work when an ini key holds a bad value.
    """
    from .fence import MODES, parse_upstream

    try:
        upstream, upstream_source = _setting(config, "depfence_upstream")
        if upstream is not None:
            parse_upstream(upstream, upstream_source)
        mode, mode_source = _setting(config, "depfence_mode")
        if mode is not None and mode not in MODES:
            raise ConfigError(mode, f"mode must be one of {', '.join(MODES)}", mode_source)
        return Settings(
            upstream=upstream,
            upstream_source=upstream_source,
            policy=_configured_policy(config),
            mode=mode or "block",
            require=_bool(_setting(config, "depfence_require")[0] or False),
            lab=_bool(_setting(config, "depfence_lab")[0] or False),
            report=_setting(config, "depfence_report")[0],
            update_contracts=_bool(_setting(config, "depfence_update_contracts")[0] or False),
        )
    except (PolicyError, ConfigError) as exc:
        raise pytest.UsageError(f"depfence: {exc}") from None


def _is_xdist_controller(config: pytest.Config) -> bool:
    return bool(getattr(config.option, "dist", "no") != "no") and not hasattr(config, "workerinput")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    config = session.config
    settings = _load_settings(config)
    config.stash[SETTINGS_KEY] = settings
    if not settings.lab or _is_xdist_controller(config):
        return
    from .lab import Lab

    try:
        lab = Lab()
        lab.__enter__()
    except (DepfenceError, OSError) as exc:
        raise pytest.UsageError(f"depfence: --depfence-lab: the lab cannot start: {exc}") from exc
    config.stash[LAB_KEY] = lab


def pytest_unconfigure(config: pytest.Config) -> None:
    lab = config.stash.get(LAB_KEY, None)
    if lab is not None:
        del config.stash[LAB_KEY]
        lab.__exit__(None, None, None)


def _upstream(config: pytest.Config) -> str | None:
    settings = config.stash[SETTINGS_KEY]
    if settings.upstream is not None:
        return str(settings.upstream)
    lab = config.stash.get(LAB_KEY, None)
    return lab.upstream if lab is not None else None


def pytest_report_header(config: pytest.Config) -> list[str]:
    from .loader import preflight

    upstream = _upstream(config) or "first nameserver of /etc/resolv.conf"
    lab = config.stash.get(LAB_KEY, None)
    if lab is not None and config.stash[SETTINGS_KEY].upstream is None:
        upstream += " (lab)"  # only when the lab's resolver is really the one in use
    try:
        state = preflight()
    except FenceUnavailable as exc:
        return [UNAVAILABLE.format(reason=exc), f"depfence: upstream {upstream}"]
    except Exception as exc:  # noqa: BLE001 - a header must never stop the session
        reason = f"the machine check failed: {type(exc).__name__}: {exc}"
        return [UNAVAILABLE.format(reason=reason), f"depfence: upstream {upstream}"]
    return [f"depfence: {state.describe()}, upstream {upstream}"]


_DEF_LINE = re.compile(r"\s*(async\s+def|def|class)\s")


def _find_marker_line(
    lines: list[str], start: int, name: str, decorators: bool, nth: int
) -> int | None:
    """The line of the nth `name(...)` marker in a def/class (decorators) or a body (pytestmark)."""
    call = re.compile(rf"(?<![\w.])(?:\w+\.)*{re.escape(name)}\s*\(")
    found: list[int] = []
    for offset, line in enumerate(lines):
        if decorators and _DEF_LINE.match(line):
            break
        # Outside the decorators, only a `pytestmark = ...` can carry the marker.
        if call.search(line) and (decorators or not line.lstrip().startswith("@")):
            found.append(start + offset)
    if not found:
        return None
    if decorators:
        # Stacked decorators apply bottom-up, and pytest lists a node's marks in that order.
        found.reverse()
    return found[nth] if nth < len(found) else found[0]


def _marker_source(item: pytest.Item, name: str, nth: int = 0, node: Any = None) -> str:
    """`marker at file:line` where the marker was written, or `marker on <node id>`.

    `node` is the node carrying the marker (the test itself, its class or its
    module); `nth` tells stacked markers of one name on that node apart.
    """
    node = node if node is not None else item
    obj = getattr(node, "obj", None)
    module = isinstance(node, pytest.Module)
    try:
        lines, start = inspect.getsourcelines(obj)  # type: ignore[arg-type]
        start = max(start, 1)  # a module's source starts at 0
        path = Path(inspect.getsourcefile(obj) or "")  # type: ignore[arg-type]
    except (TypeError, OSError):
        return f"marker on {node.nodeid}"
    try:
        shown = path.relative_to(item.config.rootpath)
    except ValueError:
        shown = path
    lineno = _find_marker_line(lines, start, name, decorators=not module, nth=nth)
    if lineno is None and isinstance(node, pytest.Class):
        lineno = _find_marker_line(lines, start, name, decorators=False, nth=nth)
    if lineno is None:
        return f"marker on {node.nodeid}"
    return f"marker at {shown}:{lineno}"


def _markers(item: pytest.Item, name: str) -> list[tuple[pytest.Mark, str]]:
    """Every `name` marker on the item, its class and module, each with where it was written."""
    result: list[tuple[pytest.Mark, str]] = []
    counts: dict[int, int] = {}
    for node, mark in item.iter_markers_with_node(name):
        nth = counts.get(id(node), 0)
        counts[id(node)] = nth + 1
        result.append((mark, _marker_source(item, name, nth, node)))
    return result


def _item_policy(item: pytest.Item) -> Policy | None:
    """The test's policy from its markers; stacked markers of one kind add up.

    Dropping all but the closest marker would silently unblock a name the
    author listed, so every no_egress (or egress_only) marker counts.
    """
    from .policy import Policy

    found = {kind: _markers(item, kind) for kind in ("no_egress", "egress_only")}
    if found["no_egress"] and found["egress_only"]:
        where = ", ".join(f"{kind} {source}" for kind in found for _, source in found[kind])
        raise ConfigError(
            "no_egress + egress_only",
            "a test takes one policy kind (a blocklist or an allowlist); choose one",
            where,
        )
    for kind, marks in found.items():
        if not marks:
            continue
        rules: list[Any] = []
        seen: set[Any] = set()
        for mark, source in marks:
            if mark.kwargs:
                raise PolicyError(repr(mark.kwargs), f"{kind} takes patterns only", source)
            if kind == "no_egress":
                policy = Policy.no_egress(*mark.args, source=source)
            else:
                policy = Policy.egress_only(*mark.args, source=source)
            for rule in policy.rules:
                key = (rule.kind, rule.name, rule.network)
                if key not in seen:
                    seen.add(key)
                    rules.append(rule)
        return Policy(kind, tuple(rules))  # type: ignore[arg-type]
    return None


def _item_fence_kwargs(item: pytest.Item) -> dict[str, Any]:
    from .fence import MODES, OUTAGES

    marker = item.get_closest_marker("fence")
    if marker is None:
        return {}
    source = _markers(item, "fence")[0][1]
    if marker.args:
        raise ConfigError(repr(marker.args), "fence() takes keyword arguments only", source)
    unknown = sorted(set(marker.kwargs) - set(FENCE_MARKER_ARGS))
    if unknown:
        raise ConfigError(
            ", ".join(f"{key}={marker.kwargs[key]!r}" for key in unknown),
            f"fence() knows {', '.join(FENCE_MARKER_ARGS)} (memory/cpus/pids are not "
            "implemented yet)",
            source,
        )
    kwargs = dict(marker.kwargs)
    if "contract" in kwargs:
        from .contract import check_name

        check_name(kwargs["contract"], source)
    if "mode" in kwargs and kwargs["mode"] not in MODES:
        raise ConfigError(str(kwargs["mode"]), f"mode must be one of {', '.join(MODES)}", source)
    if "outage" in kwargs and kwargs["outage"] not in OUTAGES:
        raise ConfigError(
            str(kwargs["outage"]), f"outage must be one of {', '.join(OUTAGES)}", source
        )
    timeout = kwargs.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0
    ):
        raise ConfigError(repr(timeout), "timeout must be a positive number of seconds", source)
    return kwargs


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    errors: list[str] = []
    for item in items:
        try:
            policy = _item_policy(item)
            kwargs = _item_fence_kwargs(item)
        except (PolicyError, ConfigError) as exc:
            errors.append(f"{item.nodeid}: {exc}")
            continue
        if policy is not None:
            item.stash[POLICY_KEY] = policy
        item.stash[FENCE_KWARGS_KEY] = kwargs
    if errors:
        raise pytest.UsageError("depfence: invalid fence configuration\n" + "\n".join(errors))


@pytest.fixture
def fenced(request: pytest.FixtureRequest) -> Iterator[Fence]:
    """A Fence configured from the test's markers, then CLI flags, then ini keys.

    `fenced.run(cmd)` runs the command inside the fence; a forbidden egress
    attempt raises EgressViolation naming the domain and the command line.
    """
    from .fence import Fence
    from .loader import load
    from .policy import Policy

    config = request.config
    settings = config.stash[SETTINGS_KEY]

    def unavailable(exc: FenceUnavailable) -> NoReturn:
        message = UNAVAILABLE.format(reason=exc)
        if settings.require:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)

    try:
        load()
    except FenceUnavailable as exc:
        unavailable(exc)
    node = request.node
    policy = node.stash.get(POLICY_KEY, None) or settings.policy or Policy("no_egress", ())
    kwargs = {"mode": settings.mode, **node.stash.get(FENCE_KWARGS_KEY, {})}
    kwargs.pop("contract", None)  # checked after the test, by pytest_runtest_call
    label = "".join(c if c.isalnum() else "-" for c in node.name)[:40] or "test"
    try:
        fence = Fence(policy, upstream=_upstream(config), label=label, **kwargs)
    except ConfigError as exc:
        pytest.fail(f"depfence: {exc}", pytrace=False)
    try:
        # The programs loaded, but the cgroup tree can still be out of reach.
        fence.open()
    except FenceUnavailable as exc:
        fence.close()
        unavailable(exc)
    node.stash[FENCE_KEY] = fence
    try:
        yield fence
    finally:
        fence.close()


# -- after each fenced test: audit warnings, contract, what the reports need ----------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    __tracebackhide__ = True  # a contract failure points at the test, not here
    try:
        result = yield
    except BaseException:
        _after_test(item, passed=False)
        raise
    _after_test(item, passed=True)
    return result


def _after_test(item: pytest.Item, passed: bool) -> None:
    """Check the contract (of a passing test), record the runs, then warn about audited ones.

    Recording comes before anything that can raise (a contract failure, an audit
    warning turned into an error), so the reports always have the test's runs.
    """
    __tracebackhide__ = True
    fence = item.stash.get(FENCE_KEY, None)
    if fence is None:
        return
    notes: list[str] = []
    failure: ContractError | None = None
    contract = item.stash.get(FENCE_KWARGS_KEY, {}).get("contract")
    if passed and contract is not None:
        try:
            notes = _contract(item, fence, contract)
        except ContractError as exc:
            failure = exc
    _record(item, notes)
    _warn_audited(item, fence)
    if failure is not None:
        raise failure


def _record(item: pytest.Item, notes: list[str]) -> None:
    """Leave the runs for the report (and JUnit), once per test."""
    from .report import run_record

    fence = item.stash[FENCE_KEY]
    if RUNS_KEY in item.stash:
        return
    runs = [
        run_record(r, policy=fence.policy.describe(), mode=fence.mode, outage=fence.outage)
        for r in fence.results
    ]
    item.stash[RUNS_KEY] = (runs, notes)
    violations = sum(len(r.violations) for r in fence.results)
    domains = sorted({d for r in fence.results for d in r.domains})
    item.user_properties.append(("depfence_violations", str(violations)))
    item.user_properties.append(("depfence_domains", " ".join(domains)))


def _warn_audited(item: pytest.Item, fence: Fence) -> None:
    """Audit mode: each run's forbidden egress, as one warning of its own class, at the test."""
    from .events import format_violations

    if fence.mode != "audit":
        return
    path, line, _ = item.location
    for result in fence.results:
        audited = [e for e in result.violations if e.verdict == "allowed"]
        if audited:
            text = AUDITED.format(report=format_violations(audited, result.command))
            warnings.warn_explicit(text, EgressAuditWarning, path, (line or 0) + 1)


def _contract(item: pytest.Item, fence: Fence, name: str) -> list[str]:
    """Check the test's egress against its contract (or write it); return notes for the report."""
    from .contract import Contract, compare, missing_text, new_destinations_text, path_for

    path = path_for(item.path, name)
    shown = _shown(item.config, path)
    events = [e for r in fence.results for e in r.events]
    regenerate = REGENERATE.format(nodeid=item.nodeid)
    if item.config.stash[SETTINGS_KEY].update_contracts:
        text = Contract.from_events(events).render(name, regenerate)
        if path.exists() and path.read_text(encoding="utf-8") == text:
            return []
        verb = "updated" if path.exists() else "created"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return [CONTRACT_WRITTEN.format(path=shown, verb=verb)]
    if not path.exists():
        raise ContractError(missing_text(shown, regenerate))
    comparison = compare(Contract.load(path), events)
    if comparison.new:
        raise ContractError(new_destinations_text(comparison, shown, regenerate))
    return [
        f"contract {shown}: {dest} is listed but was not contacted" for dest in comparison.unused
    ]


def _shown(config: pytest.Config, path: Path) -> Path:
    try:
        return path.relative_to(config.rootpath)
    except ValueError:
        return path


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    recorded = item.stash.get(RUNS_KEY, None)
    if call.when == "call" and recorded is not None:
        # Plain data: pytest-xdist carries it from a worker to the controller as it is.
        runs, notes = recorded
        setattr(report, "depfence_runs", runs)  # noqa: B010 - an attribute pytest lacks
        setattr(report, "depfence_notes", notes)  # noqa: B010
    return report


class Reporter:
    """Collects every fenced run (also from xdist workers) and writes the session's reports."""

    def __init__(self, config: pytest.Config) -> None:
        from .report import SessionReport

        self.config = config
        self.report = SessionReport()
        self.notes: list[str] = []
        self.worker = hasattr(config, "workerinput")

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        from .report import TestRuns

        runs = getattr(report, "depfence_runs", None)
        if runs is None or self.worker:
            return
        path, line, _ = report.location
        notes = list(getattr(report, "depfence_notes", []))
        self.notes.extend(notes)
        self.report.add(
            TestRuns(
                test_id=report.nodeid,
                path=path,
                line=line + 1 if line is not None else None,
                outcome=report.outcome,
                runs=runs,
                notes=notes,
            )
        )

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.worker:
            return
        if self.notes:
            terminalreporter.section("depfence contracts")
            for note in self.notes:
                terminalreporter.write_line(note)
        if os.environ.get("GITHUB_ACTIONS") == "true":
            for line in self.report.github_annotations():
                terminalreporter.write_line(line)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        settings = self.config.stash.get(SETTINGS_KEY, None)
        if self.worker or settings is None:
            return
        if settings.report:
            self.report.write(settings.report)
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if os.environ.get("GITHUB_ACTIONS") == "true" and summary:
            with open(summary, "a", encoding="utf-8") as f:
                f.write(self.report.step_summary())
