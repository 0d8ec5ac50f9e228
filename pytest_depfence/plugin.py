"""The pytest plugin: markers, options, the `fenced` fixture. The only module importing pytest.

Settings exist as marker, CLI flag and ini key; precedence is marker > CLI >
ini. Policies are parsed at collection time, so a bad pattern stops the run
before any test starts and names where it was written.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
FENCE_KWARGS_KEY = pytest.StashKey[dict]()
SETTINGS_KEY = pytest.StashKey["Settings"]()
LAB_KEY = pytest.StashKey["Lab"]()


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
    value = config.getini(name)
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
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}{text[len(name):]}")
    from .fence import MODES, parse_upstream

    try:
        upstream, upstream_source = _setting(config, "depfence_upstream")
        if upstream is not None:
            parse_upstream(upstream, upstream_source)
        mode, mode_source = _setting(config, "depfence_mode")
        if mode is not None and mode not in MODES:
            raise ConfigError(mode, f"mode must be one of {', '.join(MODES)}", mode_source)
        settings = Settings(
            upstream=upstream,
            upstream_source=upstream_source,
            policy=_configured_policy(config),
            mode=mode or "block",
            require=_bool(_setting(config, "depfence_require")[0] or False),
            lab=_bool(_setting(config, "depfence_lab")[0] or False),
        )
    except (PolicyError, ConfigError) as exc:
        raise pytest.UsageError(f"depfence: {exc}") from None
    config.stash[SETTINGS_KEY] = settings


def _is_xdist_controller(config: pytest.Config) -> bool:
    return bool(getattr(config.option, "dist", "no") != "no") and not hasattr(config, "workerinput")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    config = session.config
    settings = config.stash[SETTINGS_KEY]
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
    if config.stash.get(LAB_KEY, None) is not None:
        upstream += " (lab)"
    try:
        state = preflight()
    except FenceUnavailable as exc:
        return [f"depfence: fence unavailable: {exc}", f"depfence: upstream {upstream}"]
    return [f"depfence: {state.describe()}, upstream {upstream}"]


def _marker_source(item: pytest.Item, name: str) -> str:
    """`marker at file:line` for the decorator line, or the test id when it can't be found."""
    obj = getattr(item, "obj", None)
    try:
        lines, start = inspect.getsourcelines(obj)  # type: ignore[arg-type]
        path = Path(inspect.getsourcefile(obj) or "")  # type: ignore[arg-type]
    except (TypeError, OSError):
        return f"marker on {item.nodeid}"
    try:
        shown = path.relative_to(item.config.rootpath)
    except ValueError:
        shown = path
    for offset, line in enumerate(lines):
        if f"{name}(" in line:
            return f"marker at {shown}:{start + offset}"
    return f"marker on {item.nodeid}"


def _item_policy(item: pytest.Item) -> Policy | None:
    from .policy import Policy

    ne = item.get_closest_marker("no_egress")
    eo = item.get_closest_marker("egress_only")
    if ne is not None and eo is not None:
        raise pytest.UsageError(
            f"depfence: {item.nodeid} has both no_egress and egress_only markers; choose one"
        )
    if ne is not None:
        if ne.kwargs:
            raise PolicyError(repr(ne.kwargs), "no_egress takes patterns only",
                              _marker_source(item, "no_egress"))
        return Policy.no_egress(*ne.args, source=_marker_source(item, "no_egress"))
    if eo is not None:
        if eo.kwargs:
            raise PolicyError(repr(eo.kwargs), "egress_only takes patterns only",
                              _marker_source(item, "egress_only"))
        return Policy.egress_only(*eo.args, source=_marker_source(item, "egress_only"))
    return None


def _item_fence_kwargs(item: pytest.Item) -> dict[str, Any]:
    from .fence import MODES, OUTAGES

    marker = item.get_closest_marker("fence")
    if marker is None:
        return {}
    source = _marker_source(item, "fence")
    if marker.args:
        raise ConfigError(repr(marker.args), "fence() takes keyword arguments only", source)
    unknown = set(marker.kwargs) - set(FENCE_MARKER_ARGS)
    if unknown:
        raise ConfigError(
            ", ".join(sorted(unknown)),
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
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or timeout <= 0):
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
    try:
        load()
    except FenceUnavailable as exc:
        message = UNAVAILABLE.format(reason=exc)
        if settings.require:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    node = request.node
    policy = node.stash.get(POLICY_KEY, None) or settings.policy or Policy("no_egress", ())
    kwargs = {"mode": settings.mode, **node.stash.get(FENCE_KWARGS_KEY, {})}
    label = "".join(c if c.isalnum() else "-" for c in node.name)[:40] or "test"
    try:
        fence = Fence(policy, upstream=_upstream(config), label=label, **kwargs)
    except ConfigError as exc:
        pytest.fail(f"depfence: {exc}", pytrace=False)
    with fence:
        yield fence

