"""The pytest plugin: markers, options, the `fenced` fixture. The only module importing pytest.

Settings exist as marker, CLI flag and ini key; precedence is marker > CLI >
ini. Policies are parsed at collection time, so a bad pattern stops the run
before any test starts and names where it was written.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from .errors import ConfigError, DepfenceError, FenceUnavailable, PolicyError

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
    "fence": "fence(mode='block'|'audit', outage='nxdomain'|'servfail'|'refused'|'timeout', "
    "timeout=SECONDS): how the `fenced` fixture runs",
}
FENCE_MARKER_ARGS = ("mode", "outage", "timeout")
POLICY_KEY = pytest.StashKey["Policy"]()
FENCE_KWARGS_KEY = pytest.StashKey[dict[str, Any]]()
SETTINGS_KEY = pytest.StashKey["Settings"]()
LAB_KEY: pytest.StashKey[Lab] = pytest.StashKey()


@dataclass
class Settings:
    """Session-wide settings after CLI and ini were merged (CLI wins)."""

    upstream: str | None
    upstream_source: str
    policy: Policy | None
    mode: str
    require: bool
    lab: bool


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
    try:
        yield fence
    finally:
        fence.close()
