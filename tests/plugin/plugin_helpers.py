"""Plain helpers for the plugin-surface tests (fixtures are in conftest.py)."""

from __future__ import annotations

import importlib.metadata
import os
import re
from pathlib import Path

PLUGIN = "pytest_depfence.plugin"
ROOT = Path(__file__).resolve().parents[2]
#: Generous: an inner lab run compiles the eBPF programs once (a few seconds).
INNER_TIMEOUT = 180


def plugin_autoloaded() -> bool:
    """Whether an inner pytest loads the plugin by itself, through its pytest11 entry point.

    Then `-p pytest_depfence.plugin` must not be passed too: pluggy refuses the
    same module under a second name ("Plugin already registered under a
    different name") and the inner run dies before collecting anything.
    """
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        return False
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group == "pytest11" and ep.value.split(":")[0].strip() == PLUGIN:
                return True
    return False


def plugin_args() -> tuple[str, ...]:
    return () if plugin_autoloaded() else ("-p", PLUGIN)


def lit(text: str) -> str:
    """`text` as an fnmatch pattern that matches only itself."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def line_of(path: Path, needle: str) -> int:
    """The 1-based number of the only line of `path` containing `needle`."""
    hits = [n for n, line in enumerate(path.read_text().splitlines(), 1) if needle in line]
    assert len(hits) == 1, f"{needle!r} is on lines {hits} of {path}"
    return hits[0]
