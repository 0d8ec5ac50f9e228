"""Markers: where each was written (`marker at file:line`), and what a test's markers say.

Policies and `fence(...)` settings are read at collection time, so a bad
pattern or value stops the run before any test starts and names its marker.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .. import options, outages
from ..errors import ConfigError, PolicyError
from .settings import SETTINGS_KEY

if TYPE_CHECKING:
    from ..policy import Policy

MARKERS = {
    "no_egress": "no_egress(*patterns): fenced runs must not reach these names/addresses "
    "(github.com = it and every name below; *.github.com = names below only; CIDRs)",
    "egress_only": "egress_only(*patterns): fenced runs may reach only these names/addresses",
    "fence": "fence(mode="
    + "|".join(f"'{mode}'" for mode in options.MODES)
    + ", outage="
    + "|".join(f"'{name}'" for name in outages.OUTAGES)
    + ", timeout=SECONDS, contract=NAME, raw_sockets=False|True, ranges=FILE|[FILE, ...]): how "
    "the `fenced` fixture runs; contract pins the test's egress to depfence-contracts/NAME"
    ".contract beside the test file; raw_sockets=True keeps CAP_NET_RAW (raw and packet "
    "sockets) in the fence; ranges adds each address or CIDR of the files (relative to the "
    "test file; text or JSON such as GitHub's meta) to the policy as an address rule",
}


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


def item_policy(item: pytest.Item) -> Policy | None:
    """The test's policy from its markers; stacked markers of one kind add up.

    Dropping all but the closest marker would silently unblock a name the
    author listed, so every no_egress (or egress_only) marker counts.
    """
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
        from ..policy import Policy  # only for tests that have a policy marker

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
                if rule.key not in seen:
                    seen.add(rule.key)
                    rules.append(rule)
        return Policy(kind, tuple(rules))  # type: ignore[arg-type]
    return None


#: A marker that would protect nothing: on a test that never builds a fence.
UNFENCED = (
    "the test does not use the `fenced` fixture, so nothing it runs is fenced and the "
    "marker protects nothing; add `fenced` to its arguments and run the script with "
    "fenced.run(...)"
)


def check_fenced(item: pytest.Item) -> None:
    """A fence marker written on the test itself needs the test to use `fenced`.

    Markers of a class or module also reach tests that run nothing fenced (helpers,
    unit tests beside the deploy tests); only the test's own markers must be used.
    """
    if "fenced" in getattr(item, "fixturenames", ()):
        return
    for name in MARKERS:
        for node, _ in item.iter_markers_with_node(name):
            if node is item:
                raise ConfigError(f"{name}(...)", UNFENCED, _markers(item, name)[0][1])


def check_spelling(item: pytest.Item, registered: set[str]) -> None:
    """A mark that is not registered and reads like one of ours is a typo that would
    leave the test unfenced or unjudged (`no_egres("github.com")`): an error, not a
    warning pytest prints and the run ignores."""
    for node, mark in item.iter_markers_with_node():
        if mark.name in registered:
            continue
        near = difflib.get_close_matches(mark.name, MARKERS, n=1, cutoff=0.75)
        if near:
            raise ConfigError(
                f"{mark.name}(...)",
                f"no such marker; did you mean {near[0]}?",
                _marker_source(item, mark.name, 0, node),
            )


def item_fence_kwargs(item: pytest.Item) -> dict[str, Any]:
    """The test's `fence(...)` settings, each checked by its option's validator; without
    `ranges=` or a limit there, the session's (CLI flag, else ini key), already read."""
    kwargs = _marker_kwargs(item)
    settings = item.config.stash.get(SETTINGS_KEY, None)
    if settings is not None:
        defaults = {**settings.limits, "ranges": settings.ranges}
        kwargs = {**{k: v for k, v in defaults.items() if v}, **kwargs}
    return kwargs


def _beside(item: pytest.Item, value: Any) -> Any:
    """`ranges=` paths made absolute from the test file's directory (others left to the
    validator to refuse)."""
    if isinstance(value, (list, tuple)):
        return [_beside(item, v) for v in value]
    if isinstance(value, str) and value:
        return os.path.join(item.path.parent, value)
    return value


def _marker_kwargs(item: pytest.Item) -> dict[str, Any]:
    marker = item.get_closest_marker("fence")
    if marker is None:
        return {}
    source = _markers(item, "fence")[0][1]
    if marker.args:
        raise ConfigError(repr(marker.args), "fence() takes keyword arguments only", source)
    unknown = sorted(set(marker.kwargs) - set(options.FENCE_OPTIONS))
    if unknown:
        raise ConfigError(
            ", ".join(f"{key}={marker.kwargs[key]!r}" for key in unknown),
            f"fence() knows {', '.join(options.FENCE_OPTIONS)}",
            source,
        )
    values = dict(marker.kwargs)
    if "ranges" in values:
        values["ranges"] = _beside(item, values["ranges"])
    return {key: options.validate(key, value, source) for key, value in values.items()}
