"""Dependency contracts: the reviewed, versioned list of what fenced runs contact.

A contract is a small text file, one line per destination — a DNS name, or an
address contacted without one — with the programs that contacted it, sorted:

    # depfence contract "mysql-deploy"
    # Regenerate: pytest --depfence-update-contracts tests/test_deploy.py::test_mysql
    api.github.com                 curl
    mirror.internal                curl, python3 deploy-helper
    10.0.0.7:443/tcp               curl

The same egress always gives the same bytes, so a change shows up as a
one-line diff in review. Files live in `depfence-contracts/` beside the test
file that names them (`<name>.contract`), or wherever the CLI is told;
`write_contract` is the one way either writes one.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, ContractError
from .events import EgressEvent, FenceResult
from .render import destination

CONTRACTS_DIR = "depfence-contracts"
SUFFIX = ".contract"
#: Shown when a program could not be named (see EgressEvent.unattributed).
UNATTRIBUTED = "(unattributed)"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# argv[0]s that run the program named by their first argument.
_INTERPRETER = re.compile(r"(python[0-9.]*|pypy[0-9.]*|sh|bash|dash|zsh|node|perl|ruby|php)")


def check_name(name: object, source: str) -> str:
    """A contract name is a file name: letters, digits, '.', '_', '-'."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(
            name if isinstance(name, str) else repr(name),
            "a contract name is letters, digits, '.', '_' and '-' only",
            source,
        )
    return name


def path_for(test_file: str | os.PathLike[str], name: str) -> Path:
    """Where the contract `name` of tests in `test_file` lives."""
    return Path(test_file).parent / CONTRACTS_DIR / f"{name}{SUFFIX}"


def program_of(cmdline: str | None) -> str:
    """A stable name for the program behind a command line: `curl`, `python3 deploy-helper`."""
    if not cmdline:
        return UNATTRIBUTED
    try:
        argv = shlex.split(cmdline.removesuffix(" …"))
    except ValueError:
        argv = cmdline.split()
    if not argv:
        return UNATTRIBUTED
    program = os.path.basename(argv[0])
    if _INTERPRETER.fullmatch(program):
        program = re.sub(r"^(python|pypy)[0-9.]*$", r"\g<1>3", program)
        script = next((a for a in argv[1:] if not a.startswith("-")), None)
        if script is not None and argv[1] != "-c":
            return f"{program} {os.path.basename(script)}"
    return program


@dataclass(frozen=True)
class Contract:
    """Destinations and the programs that contacted each."""

    entries: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def from_events(cls, events: Iterable[EgressEvent]) -> Contract:
        entries: dict[str, set[str]] = {}
        for event in events:
            entries.setdefault(destination(event), set()).add(program_of(event.cmdline))
        return cls({dest: frozenset(programs) for dest, programs in entries.items()})

    def render(self, name: str, regenerate: str) -> str:
        lines = [f'# depfence contract "{name}"', f"# Regenerate: {regenerate}"]
        width = max((len(dest) for dest in self.entries), default=0)
        for dest in sorted(self.entries):
            lines.append(f"{dest:<{width}}  {', '.join(sorted(self.entries[dest]))}".rstrip())
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, text: str, path: str | os.PathLike[str]) -> Contract:
        entries: dict[str, frozenset[str]] = {}
        for number, line in enumerate(text.splitlines(), 1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            dest, _, programs = stripped.partition(" ")
            if dest in entries:
                raise ContractError(f"{path}:{number}: {dest} is listed twice")
            names = frozenset(p.strip() for p in programs.split(",") if p.strip())
            entries[dest] = names or frozenset({UNATTRIBUTED})
        return cls(entries)

    @classmethod
    def load(cls, path: Path) -> Contract:
        return cls.parse(path.read_text(encoding="utf-8"), path)


@dataclass(frozen=True)
class Comparison:
    """How observed egress differs from a contract."""

    #: Destinations contacted but not in the contract, with the events that did it.
    new: Mapping[str, tuple[EgressEvent, ...]]
    #: Destinations in the contract that nothing contacted this time.
    unused: tuple[str, ...]


def compare(contract: Contract, events: Iterable[EgressEvent]) -> Comparison:
    new: dict[str, list[EgressEvent]] = {}
    seen: set[str] = set()
    for event in events:
        dest = destination(event)
        seen.add(dest)
        if dest not in contract.entries:
            new.setdefault(dest, []).append(event)
    unused = tuple(sorted(dest for dest in contract.entries if dest not in seen))
    return Comparison({dest: tuple(evs) for dest, evs in sorted(new.items())}, unused)


def new_destinations_text(comparison: Comparison, path: Path, regenerate: str) -> str:
    """The failure for egress a contract does not list: each destination and who asked."""
    count = len(comparison.new)
    lines = [
        f"{count} destination{'s' if count != 1 else ''} not in the contract {path}:",
    ]
    for dest, events in comparison.new.items():
        commands = sorted({e.cmdline or f"({e.unattributed or 'unattributed'})" for e in events})
        lines.append(f"  {dest}")
        lines.extend(f"      contacted by: {command}" for command in commands)
    lines.append(f"If this is intended, update the contract: {regenerate}")
    return "\n".join(lines)


def missing_text(path: Path, regenerate: str) -> str:
    return f"no contract at {path}; create it with: {regenerate}"


def write_contract(path: Path, text: str) -> str | None:
    """Write a contract file atomically: "created", "updated", or None when unchanged.

    A reader (a concurrent test, an editor, git) sees the old file or the new
    one, never a part: the text goes to a temporary file in the same directory,
    which then replaces the contract. A failure leaves the old file as it was.
    """
    data = text.encode("utf-8")
    before: bytes | None
    mode: int | None
    try:
        before, mode = path.read_bytes(), path.stat().st_mode & 0o7777
    except FileNotFoundError:
        before, mode = None, None
    if before == data:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # O_EXCL: never write through a file (or link) that is already there; mode per umask.
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:  # a rewritten contract keeps its permissions
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return "created" if before is None else "updated"


def audit_list(result: FenceResult) -> str:
    """What `depfence audit` prints: each destination with the programs that contacted it."""
    contract = Contract.from_events(result.events)
    count = len(contract.entries)
    if not count:
        return f"depfence audit: nothing contacted while running {result.command}\n"
    # The contract's entries, without its header: the list a contract file would hold.
    body = ["  " + line for line in contract.render("audit", "").splitlines()[2:]]
    head = (
        f"depfence audit: {count} destination{'s' if count != 1 else ''} contacted "
        f"while running {result.command}:"
    )
    return "\n".join([head, *body]) + "\n"
