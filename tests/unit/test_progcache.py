"""The program cache's file and instruction handling, without root or bcc.

What a cached program's instructions may hold (map fds only, which are set again at
load), and a file that is damaged or belongs to other programs is never loaded. Real
compiles and loads are in tests/integration/test_program_cache.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from pathlib import Path
from types import ModuleType

import pytest

from pytest_depfence import cachedir
from pytest_depfence.kernel import progcache, progload, toolkit
from pytest_depfence.kernel.progcache import Program


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One struct bpf_insn, little-endian."""
    return struct.pack("<BBhi", code, dst | src << 4, off, imm)


def ld_map(fd: int, src: int = 1) -> bytes:
    """r1 = map fd (ld_imm64: two instructions)."""
    return insn(0x18, dst=1, src=src, imm=fd) + insn(0)


EXIT = insn(0xB7, dst=0, imm=0) + insn(0x95)  # r0 = 0; exit


def test_map_references_name_each_map_fd_by_its_table() -> None:
    code = ld_map(7) + insn(0x85, imm=1) + ld_map(9) + EXIT  # lookup, then another map
    assert progcache.map_references(code, {7: "fences", 9: "procs"}) == (
        (0, "fences"),
        (3, "procs"),
    )


@pytest.mark.parametrize(
    "code",
    [
        ld_map(7, src=2) + EXIT,  # BPF_PSEUDO_MAP_VALUE: an address inside a map
        ld_map(7, src=3) + EXIT,  # BPF_PSEUDO_BTF_ID
        insn(0x85, src=1, imm=4) + EXIT,  # a call of another BPF function
        ld_map(8) + EXIT,  # an fd no table has
    ],
    ids=["map value", "btf id", "bpf-to-bpf call", "unknown fd"],
)
def test_a_program_with_anything_but_known_map_fds_is_not_cached(code: bytes) -> None:
    assert progcache.map_references(code, {7: "fences"}) is None


def test_an_immediate_that_looks_like_a_map_fd_is_left_alone() -> None:
    # r1 = 7 (a 64-bit immediate, no pseudo source): a number, not a map.
    code = ld_map(7, src=0) + EXIT
    assert progcache.map_references(code, {7: "fences"}) == ()


def test_relocation_sets_each_reference_to_the_new_fd_and_nothing_else() -> None:
    code = ld_map(7) + insn(0x85, imm=1) + ld_map(9) + EXIT
    program = Program("egress", 8, 1, code, ((0, "fences"), (3, "procs")))
    moved = progcache.relocated(program, {"fences": 31, "procs": 1000})
    assert moved == ld_map(31) + insn(0x85, imm=1) + ld_map(1000) + EXIT


def test_a_cached_program_keeps_the_name_bcc_gives_it() -> None:
    # libbcc leaves its section prefix out of the kernel's 15-byte name (bpftool prog show)
    assert progload.object_name("raw_tracepoint__sys_enter") == b"sys_enter"
    assert progload.object_name("raw_tracepoint__sched_process_exit") == b"sched_process_e"
    assert progload.object_name("connect4") == b"connect4"
    assert progload.object_name("egress") == b"egress"


def test_kinds_are_the_cgroup_programs_and_raw_tracepoints_only() -> None:
    assert progcache.kind_of("connect4") == (toolkit.PROG_TYPE_CGROUP_SOCK_ADDR, 10)
    assert progcache.kind_of("egress") == (toolkit.PROG_TYPE_CGROUP_SKB, 1)
    assert progcache.kind_of("raw_tracepoint__sys_enter") == (toolkit.PROG_TYPE_RAW_TRACEPOINT, 0)
    assert progcache.kind_of("tracepoint__sched__sched_process_fork") is None
    tp = Program("raw_tracepoint__sys_exit", 17, 0, EXIT, ())
    assert tp.tracepoint == "sys_exit"
    assert Program("egress", 8, 1, EXIT, ()).tracepoint is None


def encoded(key: str, programs: list[dict[str, object]]) -> bytes:
    """A file as `_encode` writes it from a compiled object."""
    body = json.dumps(
        {
            "format": progcache.FORMAT,
            "key": key,
            "license": "GPL",
            "programs": programs,
            "tables": {"fences": ["k", "v"]},
        },
        sort_keys=True,
    ).encode()
    return hashlib.sha256(body).hexdigest().encode() + b"\n" + body


ONE = [
    {"name": "egress", "prog_type": 8, "attach_type": 1, "insns": base64.b64encode(EXIT).decode(),
     "maps": []}
]  # fmt: skip


def test_a_whole_file_for_this_key_decodes() -> None:
    record = progcache._decode(encoded("k1", ONE), "k1")
    assert record == progcache.Record(
        b"GPL", [Program("egress", 8, 1, EXIT, ())], {"fences": ("k", "v")}
    )


def test_a_file_for_another_key_or_damaged_is_not_loaded() -> None:
    raw = encoded("k1", ONE)
    assert progcache._decode(raw, "k2") is None
    flipped = bytearray(raw)
    flipped[-20] ^= 0x01  # one bit of the body: the checksum no longer matches
    assert progcache._decode(bytes(flipped), "k1") is None
    assert progcache._decode(raw[: len(raw) // 2], "k1") is None  # cut short
    assert progcache._decode(b"", "k1") is None


def test_a_checksummed_file_of_the_wrong_shape_is_not_loaded() -> None:
    wrong = [{"name": "egress", "insns": "not base64!"}]
    assert progcache._decode(encoded("k1", wrong), "k1") is None


def test_the_cache_is_where_the_variable_says_or_off(monkeypatch: pytest.MonkeyPatch) -> None:
    bcc = ModuleType("bcc")
    monkeypatch.setenv(progcache.CACHE_ENV, "off")
    assert progcache.Cache.here(bcc, "", []) is None
    monkeypatch.setenv(progcache.CACHE_ENV, "/somewhere/else")
    assert progcache.Cache.here(bcc, "", []).directory == Path("/somewhere/else")  # type: ignore[union-attr]
    monkeypatch.delenv(progcache.CACHE_ENV)
    assert progcache.Cache.here(bcc, "", []).directory == cachedir.cache_dir()  # type: ignore[union-attr]


def test_the_key_covers_the_text_the_flags_and_the_libraries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def key(text: str = "int x;", flags: tuple[str, ...] = ("-DA=1",)) -> str:
        return progcache.Cache(tmp_path, text, list(flags), "bcc 0.26").key

    assert key() == key()
    assert key(text="int y;") != key()
    assert key(flags=("-DA=2",)) != key()
    assert key(flags=("-DA=1", "-DB=1")) != key(flags=("-DA=1 -DB=1",))  # not just joined
    library = tmp_path / "libLLVM-14.so.1"
    library.write_bytes(b"one")
    mapped = [str(library)]  # stands in for /proc/self/maps, which has no bcc here
    monkeypatch.setattr(progcache, "compiler_libraries", lambda: map(progcache._identity, mapped))
    before = key()
    library.write_bytes(b"two!")  # another build of the compiler: another size and time
    assert key() != before


def test_the_compiler_libraries_are_named_with_their_identity() -> None:
    (libc,) = set(progcache.compiler_libraries(("libc.so",)))
    path, size, inode, mtime = libc.rsplit(":", 3)
    st = os.stat(path)
    assert (int(size), int(inode), int(mtime)) == (st.st_size, st.st_ino, st.st_mtime_ns)


C = """\
struct owner { __u32 pid; struct { __u8 a; } inner; };  /* a struct: kept */
BPF_HASH(fences, __u64, struct owner, 16);
static const char *brace = "{";
static __always_inline int helper(int x)
{
    if (x) { return '}'; }  // braces in a string, a character and a comment: {
#pragma clang loop unroll(disable)
    for (;;) { break; }
#ifdef X
    return 1;
#endif
    return 0;
}
PROGRAM int egress(struct __sk_buff *skb) { return helper(1); }
BPF_ARRAY(after, __u64, 1);
"""


def test_declarations_empty_each_function_body_and_keep_the_rest() -> None:
    assert progcache.declarations(C) == (
        "struct owner { __u32 pid; struct { __u8 a; } inner; };  /* a struct: kept */\n"
        "BPF_HASH(fences, __u64, struct owner, 16);\n"
        'static const char *brace = "{";\n'
        "static __always_inline int helper(int x)\n"
        "{}\n#ifdef X\n\n#endif\n\n"  # the conditional stays whole, the loop pragma goes
        "PROGRAM int egress(struct __sk_buff *skb) {}\n"
        "BPF_ARRAY(after, __u64, 1);\n"
    )


def test_declarations_of_braces_an_if_branch_leaves_open_are_none() -> None:
    unbalanced = "int f(int x)\n{\n#ifdef A\n    if (x) {\n#else\n    if (!x) {\n#endif\n    }\n}\n"
    assert progcache.declarations(unbalanced) is None


def test_the_programs_own_sources_have_declarations() -> None:
    text = toolkit.program_text()
    found = progcache.declarations(text)
    assert found is not None and len(found) < len(text) * 0.7
    assert "BPF_ARRAY(name_hash_mul" in found and "hash = hash * mul" not in found


def test_a_relative_cache_directory_is_not_used_and_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(progcache.CACHE_ENV, "cache-here")
    cache = progcache.Cache.here(ModuleType("bcc"), "int x;", [])
    assert cache is not None
    assert cache.read() is None
    assert cache.status == (
        "compiled: the cache is not used (DEPFENCE_PROGRAM_CACHE='cache-here' is not an "
        "absolute path)"
    )
    assert not Path("cache-here").exists()
