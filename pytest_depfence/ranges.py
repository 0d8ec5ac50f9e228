"""Published address ranges as policy input: files of addresses and networks, read once.

A ranges file is plain text -- one address or CIDR per line, `#` comments,
blank lines -- or a JSON document such as GitHub's https://api.github.com/meta,
in which every string value, at any depth, that parses as an IP address or
network is a range (keys, numbers and other strings are ignored). Each range
becomes a network rule of the policy (`policy.parse_network`), judged like a
written `140.82.112.0/20`; its source names the file and the line or the JSON
key path (`ranges file tests/github-meta.json ["api"][3]`), so a violation says
where the range came from. What a rule means is `policy`'s business; this
module only reads files. A file is parsed once per content (path, size,
mtime): a session whose tests share one file reads it once.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, PolicyError
from .policy import Rule, parse_network

__all__ = ["Ranges", "load", "parse_json", "parse_text"]

#: What a rule's source says, before the line (`:3`) or the JSON key path.
SOURCE = "ranges file {file}"
NO_RANGE = "no address or network in it (a ranges file lists addresses and CIDRs)"


@dataclass(frozen=True)
class Ranges:
    """One ranges file, read: where it is, as reports show it, and its network rules
    (in file order, each network once)."""

    path: str
    shown: str
    rules: tuple[Rule, ...]


class _Bad(Exception):
    """A reason a file cannot be used; `load` adds the value and where it was given."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def load(path: str | os.PathLike[str], where: str) -> Ranges:
    """Read the ranges file at `path` (relative to the current directory).

    ConfigError names the path (relative to the current directory when below it),
    `where` it was given, and why: no such file, unreadable, not valid JSON, a
    line that is not an address or network (with file:line), a JSON range with
    host bits set (with its key path), or no range at all.
    """
    full = os.path.abspath(os.fspath(path))
    shown = _shown(full)
    try:
        st = os.stat(full)
    except FileNotFoundError:
        raise ConfigError(shown, f"no such ranges file ({full})", where) from None
    except OSError as exc:
        raise ConfigError(shown, f"cannot read the ranges file: {exc.strerror}", where) from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(shown, "a ranges file must be a regular file", where)
    try:
        return _read(full, shown, st.st_size, st.st_mtime_ns)
    except _Bad as exc:
        raise ConfigError(shown, exc.reason, where) from None


def _shown(full: str) -> str:
    """The path as reports show it: relative to the current directory when below it."""
    relative = os.path.relpath(full)
    return full if relative.startswith("..") else relative


@functools.lru_cache(maxsize=32)
def _read(full: str, shown: str, size: int, mtime_ns: int) -> Ranges:
    """`size` and `mtime_ns` only key the cache: an edited file is read again."""
    try:
        with open(full, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise _Bad(f"cannot read the ranges file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise _Bad(f"not UTF-8 text (byte {exc.start})") from None
    if full.endswith(".json") or text.lstrip()[:1] in ("{", "["):
        rules = parse_json(text, shown)
    else:
        rules = parse_text(text, shown)
    if not rules:
        raise _Bad(NO_RANGE)
    return Ranges(full, shown, rules)


def _unique(rules: Iterator[Rule]) -> tuple[Rule, ...]:
    seen: set[Any] = set()
    kept = []
    for rule in rules:
        if rule.key not in seen:
            seen.add(rule.key)
            kept.append(rule)
    return tuple(kept)


def parse_text(text: str, shown: str) -> tuple[Rule, ...]:
    """One address or network per line; `#` starts a comment; blank lines are skipped.
    A line that is anything else raises naming `shown:line` and its text."""
    source = SOURCE.format(file=shown)

    def rules() -> Iterator[Rule]:
        for number, line in enumerate(text.splitlines(), 1):
            entry = line.split("#", 1)[0].strip()
            if not entry:
                continue
            try:
                yield parse_network(entry, f"{source}:{number}", shown)
            except PolicyError as exc:
                raise _Bad(f"{shown}:{number}: {entry!r} is not a range: {exc.reason}") from None

    return _unique(rules())


def parse_json(text: str, shown: str) -> tuple[Rule, ...]:
    """Every string value of a JSON document that parses as an address or network, at any
    depth, named by its key path; a network with host bits set raises naming it."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _Bad(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    source = SOURCE.format(file=shown)

    def rules() -> Iterator[Rule]:
        for key_path, value in _strings(document, ""):
            try:
                yield parse_network(value, f"{source} {key_path}", shown)
            except PolicyError as exc:
                try:
                    ipaddress.ip_network(value, strict=False)
                except ValueError:
                    continue  # a name, a key fingerprint, a date: not a range
                raise _Bad(f"{shown} {key_path}: {value!r} is not a range: {exc.reason}") from None

    return _unique(rules())


def _strings(node: Any, path: str) -> Iterator[tuple[str, str]]:
    """(key path, value) of every string in a JSON value, in document order."""
    if isinstance(node, str):
        yield path, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, f"{path}[{json.dumps(key)}]")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _strings(value, f"{path}[{index}]")
