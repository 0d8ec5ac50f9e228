"""A per-machine cache of the programs bcc compiled, so that a later process's first
fence has bcc compile the maps alone.

Compiling is most of a first fence: ~450 ms of ~660 in clang's three parses, LLVM's
-O3 pipeline and its BPF code generation, the same work in every process for the same
instructions. Those depend only on the C text, its -D flags, bcc's, clang's and LLVM's
libraries and the kernel header tree; `Cache.key` is a digest of all of them (the
libraries and headers by path, size, inode and modification time).

After a compile whose programs all loaded, `Cache.store` writes each program's
instructions to `programs-<key>` in the cache directory (`cachedir`: its owner's and
writable by nobody else, /var/cache/pytest-depfence for root), with the map each
map reference names (the instruction holds the map's fd, which is this process's),
checksummed, under a temporary name renamed into place.

`Cache.load` builds the program set from it: bcc compiles the same text with
DEPFENCE_MAPS_ONLY (bpf/depfence.c), which makes every program a static function
nothing calls, and with every function body emptied (`declarations`), so bcc makes the
same maps and its tables work as after a full compile (~140 ms); their key and leaf
types must be the ones the file recorded from the full compile. Each cached program,
its map references set to the new maps' fds, is loaded by BPF_PROG_LOAD with its
expected attach type, and checked by the verifier as a compiled one is; each raw
tracepoint is attached by bcc (`attach_raw_tracepoint`), as its own autoload does.

The cache never decides what a fence enforces: a missing, foreign, damaged or stale
file means a compile, as without it, and a cached set that does not load is removed
and compiled. Only raw tracepoints and the programs of `toolkit.ATTACH_TYPES` are
cached (a kernel without BTF, which needs classic tracepoints, always compiles), and
only instructions whose only pseudo operands are map fds.
DEPFENCE_PROGRAM_CACHE=off turns the cache off; a directory puts it there.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import functools
import hashlib
import json
import os
import platform
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from .. import cachedir
from ..errors import FenceUnavailable
from . import machine, toolkit
from .progload import libbcc

#: Unset: `cachedir.cache_dir()`; "off": no cache; else the directory to keep it in.
CACHE_ENV = "DEPFENCE_PROGRAM_CACHE"
#: Bumped when the file's layout or what a key covers changes.
FORMAT = 2
#: The maps-alone compile: programs are static functions nothing calls (bpf/depfence.c),
#: with empty bodies (`declarations`), which return nothing.
MAPS_ONLY_FLAGS = ("-DDEPFENCE_MAPS_ONLY=1", "-Wno-return-type")
RAW_TRACEPOINT_PREFIX = "raw_tracepoint__"
#: Program sets kept; older ones (another version's, other flags') are removed.
KEEP = 4
#: Libraries whose code makes the instructions (bcc links clang and LLVM).
_COMPILER_LIBRARIES = ("libbcc", "libclang", "libLLVM")

# struct bpf_insn (uapi/linux/bpf.h): code, dst_reg:4 | src_reg:4, off, imm; 8 bytes.
_INSN = 8
_LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW, two instructions long
_CALL = 0x85  # BPF_JMP | BPF_CALL
_PSEUDO_MAP_FD = 1


@dataclass(frozen=True)
class Record:
    """What a cache file holds: the programs, their license, and each table's key and
    leaf types as bcc described them in the full compile (name -> (key, leaf))."""

    license: bytes
    programs: list[Program]
    tables: dict[str, tuple[str, str]]


@dataclass(frozen=True)
class Program:
    """One cached program: how it is loaded and where its map references are."""

    name: str
    prog_type: int
    attach_type: int
    insns: bytes
    #: (instruction index, table name) of each ld_imm64 of a map fd.
    maps: tuple[tuple[int, str], ...]

    @property
    def tracepoint(self) -> str | None:
        """The raw tracepoint it is attached to (None: a cgroup program, attached per fence)."""
        if self.name.startswith(RAW_TRACEPOINT_PREFIX):
            return self.name[len(RAW_TRACEPOINT_PREFIX) :]
        return None


def kind_of(name: str) -> tuple[int, int] | None:
    """(program type, expected attach type) of a function the programs have, or None
    for one the cache does not load (a classic tracepoint, say)."""
    if name in toolkit.ATTACH_TYPES:
        return toolkit.cgroup_program_kind(name)
    if name.startswith(RAW_TRACEPOINT_PREFIX):
        return toolkit.PROG_TYPE_RAW_TRACEPOINT, 0
    return None


def map_references(insns: bytes, tables: dict[int, str]) -> tuple[tuple[int, str], ...] | None:
    """(index, table name) of every map fd in `insns`, by `tables` (fd -> name); None when
    an instruction has another pseudo operand (a map value, a BTF id, a function), or
    an fd no table has: such a program is not cached."""
    found = []
    index, count = 0, len(insns) // _INSN
    while index < count:
        code, src = insns[index * _INSN], insns[index * _INSN + 1] >> 4
        if code == _LD_IMM64:
            if src == _PSEUDO_MAP_FD:
                at = index * _INSN + 4
                fd = int.from_bytes(insns[at : at + 4], "little", signed=True)
                if fd not in tables:
                    return None
                found.append((index, tables[fd]))
            elif src:
                return None
            index += 2
            continue
        if code == _CALL and src:
            return None
        index += 1
    return tuple(found)


def relocated(program: Program, fd_of: dict[str, int]) -> bytes:
    """`program`'s instructions with each map reference set to `fd_of[table]`."""
    insns = bytearray(program.insns)
    for index, table in program.maps:
        at = index * _INSN + 4
        insns[at : at + 4] = fd_of[table].to_bytes(4, "little", signed=True)
    return bytes(insns)


#: What `declarations` looks at: comments, string and character literals, preprocessor
#: lines (with their continuations), and braces.
_C_TOKENS = re.compile(
    r"//[^\n]*|/\*.*?\*/|\"(?:\\.|[^\"\\\n])*\"|'(?:\\.|[^'\\\n])*'"
    r"|^[ \t]*#(?:\\\n|[^\n])*|[{}]",
    re.S | re.M,
)


def declarations(text: str) -> str | None:
    """`text` with every function's body emptied (`{}`): what the maps-alone compile
    parses three times instead of all of it (~35 ms less). A brace opens a function's
    body when it comes, outside any other, right after a `)`; the preprocessor lines
    in a body are kept after it (but loop pragmas), so that conditionals stay whole.
    None when the braces do not balance (an `#if` branch opening one the other closes):
    the whole text is compiled then. `Cache.load` checks that the tables come out as
    the full compile's."""
    out: list[str] = []
    depth, kept = 0, 0
    directives: list[str] = []
    for token in _C_TOKENS.finditer(text):
        found = token.group()
        if found == "{":
            if depth:
                depth += 1
            elif text[kept : token.start()].rstrip().endswith(")"):  # a function's body
                out += [text[kept : token.start()], "{}"]
                depth = 1
        elif found == "}" and depth:
            depth -= 1
            if depth == 0:
                out += directives
                directives, kept = [], token.end()
        elif depth and found.lstrip().startswith("#"):
            directive = found.lstrip()
            if not directive[1:].lstrip().startswith("pragma"):
                directives.append("\n" + directive + "\n")
    if depth:
        return None
    return "".join([*out, text[kept:]])


def described_tables(bpf: Any) -> dict[str, tuple[str, str]]:
    """Each table of bcc object `bpf`: name -> (key type, leaf type), as bcc describes them."""
    lib = libbcc(bpf)
    return {
        name: (
            lib.bpf_table_key_desc(bpf.module, name.encode()).decode(),
            lib.bpf_table_leaf_desc(bpf.module, name.encode()).decode(),
        )
        for name in table_fds(bpf)
    }


def _libbcc_tables(lib: Any) -> Any:
    """libbcc with the table-listing calls declared (bcc's Python package does not
    declare them all before 0.2x); the C functions are there from 0.18 on."""
    for name, restype, argtypes in (
        ("bpf_num_tables", ctypes.c_size_t, [ctypes.c_void_p]),
        ("bpf_table_name", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_size_t]),
        ("bpf_table_fd_id", ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t]),
    ):
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    return lib


def table_fds(bpf: Any) -> dict[str, int]:
    """Every table of bcc object `bpf` by name -> its map fd."""
    lib = _libbcc_tables(libbcc(bpf))
    return {
        lib.bpf_table_name(bpf.module, i).decode(): lib.bpf_table_fd_id(bpf.module, i)
        for i in range(lib.bpf_num_tables(bpf.module))
    }


def _identity(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return f"{path}:missing"
    return f"{path}:{st.st_size}:{st.st_ino}:{st.st_mtime_ns}"


def compiler_libraries(names: tuple[str, ...] = _COMPILER_LIBRARIES) -> list[str]:
    """The identity of each library this process has mapped whose file name starts with
    one of `names` (bcc's, clang's and LLVM's): path, size, inode, modification time."""
    found = set()
    with open("/proc/self/maps", errors="surrogateescape") as maps:
        for line in maps:
            fields = line.rstrip("\n").split(maxsplit=5)
            if len(fields) == 6 and os.path.basename(fields[5]).startswith(names):
                found.add(fields[5])
    return [_identity(path) for path in sorted(found)]


def headers_identity() -> list[str]:
    """The kernel header tree bcc compiles against (`build` and `source`, resolved)."""
    modules = Path("/lib/modules") / platform.release()
    parts = []
    for name in ("build", "source"):
        tree = os.path.realpath(modules / name)
        parts += [_identity(tree), _identity(os.path.join(tree, "include/generated/autoconf.h"))]
    return parts


@dataclass
class Cache:
    """The cached program set of one text and flag list, in `directory`."""

    directory: Path
    text: str
    flags: list[str]
    #: bcc's Python package: its version and its files' identities.
    bcc: str
    #: How the programs came to be in this process, in words (`Programs.built`).
    status: str = ""
    #: Why there is no directory to use (a relative DEPFENCE_PROGRAM_CACHE, no home).
    unusable: str = ""

    @classmethod
    def here(cls, bcc: ModuleType, text: str, flags: list[str]) -> Cache | None:
        """The cache for these programs, where DEPFENCE_PROGRAM_CACHE says (None: off)."""
        configured = os.environ.get(CACHE_ENV)
        if configured is not None and configured.strip().lower() == "off":
            return None
        package = os.path.dirname(getattr(bcc, "__file__", None) or "bcc")
        described = [machine.bcc_version(bcc)] + [
            _identity(os.path.join(package, name)) for name in ("__init__.py", "libbcc.py")
        ]
        directory, unusable = Path(configured or "."), ""
        if configured and not os.path.isabs(configured):
            unusable = f"{CACHE_ENV}={configured!r} is not an absolute path"
        elif not configured:
            try:
                directory = cachedir.cache_dir()
            except cachedir.Unsafe as exc:
                unusable = str(exc)
        return cls(directory, text, flags, " ".join(described), unusable=unusable)

    @functools.cached_property
    def key(self) -> str:
        digest = hashlib.sha256()
        parts = [
            str(FORMAT), self.text, *self.flags, self.bcc, platform.release(),
            platform.machine(), *compiler_libraries(), *headers_identity(),
        ]  # fmt: skip
        for part in parts:
            raw = part.encode(errors="surrogateescape")
            digest.update(len(raw).to_bytes(8, "little") + raw)
        return digest.hexdigest()

    @functools.cached_property
    def path(self) -> Path:
        """Its file (the cache directory is made if missing): OSError, or cachedir.Unsafe."""
        if self.unusable:
            raise cachedir.Unsafe(self.unusable)
        return cachedir.prepare(self.directory) / f"programs-{self.key[:32]}"

    # -- reading ------------------------------------------------------------------------

    def read(self) -> Record | None:
        """What is cached for this key, or None (`status` says why)."""
        try:
            # Not a FIFO's wait for a writer, nor a link's target.
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise cachedir.Unsafe(f"{self.path} is not a regular file")
                cachedir.check_owned(self.path, st=st)
                raw = f.read()
        except FileNotFoundError:
            self.status = "compiled: nothing was cached for these programs"
            return None
        except (OSError, cachedir.Unsafe) as exc:
            self.status = f"compiled: the cache is not used ({exc})"
            return None
        record = _decode(raw, self.key)
        if record is None:
            self.status = f"compiled: {self.path} was damaged"
        return record

    def load(self, bcc: ModuleType) -> tuple[Any, dict[str, Any]] | None:
        """bcc's object of the maps and the cached programs loaded into it, raw tracepoints
        attached: (bpf, cgroup programs by name); None when nothing usable is cached."""
        record = self.read()
        if record is None:
            return None
        text = declarations(self.text) or self.text
        try:
            bpf = toolkit.compile_with(bcc, text, [*self.flags, *MAPS_ONLY_FLAGS])
        except FenceUnavailable as exc:
            self.status = f"compiled: the maps alone did not compile ({exc.reason})"
            return None
        try:
            differ = sorted(set(described_tables(bpf).items()) ^ set(record.tables.items()))
            if differ:
                raise ValueError(f"the maps alone differ from the compiled ones: {differ[0][0]}")
            fns = _load_into(bcc, bpf, record.license, record.programs)
        except Exception as exc:  # noqa: BLE001 - bcc's attach raises plain Exception
            bpf.cleanup()  # its maps, the programs loaded so far, the attached tracepoints
            why = exc.reason.splitlines()[0] if isinstance(exc, FenceUnavailable) else exc
            self.status = f"compiled: the cached programs did not load ({why})"
            with contextlib.suppress(OSError):
                self.path.unlink()
            return None
        self.status = f"loaded from {self.path}"
        return bpf, fns

    # -- writing ------------------------------------------------------------------------

    def store(self, bpf: Any) -> None:
        """Keep the programs of `bpf` (a full compile whose programs all loaded) for later
        processes; `status` adds what was done (a cache that cannot be written is no
        error: the next process compiles too)."""
        record = _encode(bpf, self.key)
        if record is None:
            self.status += "; not cached: a program is not one the cache can load"
            return
        try:
            path = self.path
            partial = path.with_name(f".{path.name}.{os.getpid()}")
            try:
                flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
                with os.fdopen(os.open(partial, flags, 0o600), "wb") as f:
                    f.write(record)
                os.replace(partial, path)  # a reader sees the old file or the new, whole
            finally:
                partial.unlink(missing_ok=True)
        except (OSError, cachedir.Unsafe) as exc:
            self.status += f"; not cached ({exc})"
            return
        self.status += f"; cached at {path}"
        _prune(path.parent, keep=path)


def _load_into(
    bcc: ModuleType, bpf: Any, license_: bytes, programs: list[Program]
) -> dict[str, Any]:
    fd_of = table_fds(bpf)
    fns: dict[str, Any] = {}
    for program in programs:
        kind = kind_of(program.name)
        if kind is None or (program.prog_type, program.attach_type) != kind:
            raise ValueError(f"{program.name} is not a program of this version")
        loaded = toolkit.load_compiled(program.name, *kind, relocated(program, fd_of), license_)
        # Registered as bcc's own load_func registers it: attach_raw_tracepoint finds it
        # there, and cleanup() closes it.
        name = program.name.encode()
        bpf.funcs[name] = bcc.BPF.Function(bpf, name, loaded.fd)
        if program.tracepoint is None:
            fns[program.name] = loaded
        else:
            bpf.attach_raw_tracepoint(tp=program.tracepoint.encode(), fn_name=name)
    missing = set(toolkit.ATTACH_TYPES) - set(fns)
    if missing:
        raise ValueError(f"the cache has no {', '.join(sorted(missing))}")
    return fns


def _encode(bpf: Any, key: str) -> bytes | None:
    """The file for the programs of `bpf`: a checksum line, then JSON; None when a
    program is not one the cache can load again (`kind_of`, `map_references`), or bcc
    attached a tracepoint that is not raw."""
    if getattr(bpf, "tracepoint_fds", None):
        return None
    lib = libbcc(bpf)
    names = {fd: name for name, fd in table_fds(bpf).items()}
    programs = []
    for i in range(lib.bpf_num_functions(bpf.module)):
        name = lib.bpf_function_name(bpf.module, i)
        kind = kind_of(name.decode())
        if kind is None:
            return None
        insns = ctypes.string_at(
            lib.bpf_function_start(bpf.module, name), lib.bpf_function_size(bpf.module, name)
        )
        maps = map_references(insns, names)
        if maps is None:
            return None
        programs.append(
            {
                "name": name.decode(),
                "prog_type": kind[0],
                "attach_type": kind[1],
                "insns": base64.b64encode(insns).decode(),
                "maps": [list(ref) for ref in maps],
            }
        )
    license_ = lib.bpf_module_license(bpf.module)
    tables = {name: list(types) for name, types in described_tables(bpf).items()}
    record = {"format": FORMAT, "key": key, "license": license_.decode()}
    body = json.dumps({**record, "programs": programs, "tables": tables}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest().encode() + b"\n" + body.encode()


def _decode(raw: bytes, key: str) -> Record | None:
    """What `_encode` wrote, if it is whole and for `key`; else None."""
    checksum, _, body = raw.partition(b"\n")
    if hashlib.sha256(body).hexdigest().encode() != checksum:
        return None
    try:
        record = json.loads(body)
        if record["format"] != FORMAT or record["key"] != key:
            return None
        programs = [
            Program(
                p["name"],
                int(p["prog_type"]),
                int(p["attach_type"]),
                base64.b64decode(p["insns"], validate=True),
                tuple((int(index), str(table)) for index, table in p["maps"]),
            )
            for p in record["programs"]
        ]
        tables = {str(name): (str(k), str(v)) for name, (k, v) in record["tables"].items()}
        return Record(str(record["license"]).encode(), programs, tables)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _prune(directory: Path, keep: Path) -> None:
    """Remove all but the KEEP newest program sets (`keep`, just written, among them)."""
    try:
        sets = sorted(
            (p for p in directory.glob("programs-*") if p != keep),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        for old in sets[KEEP - 1 :]:
            old.unlink(missing_ok=True)
    except OSError:
        pass
