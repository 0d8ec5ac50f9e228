"""The machine-dependent -D flags of the raw tracepoints (kernel/tracing.py), without a kernel:
every syscall number and register the C uses is passed for both architectures, and the
BTF reader finds member offsets in a BTF blob built here (and refuses what it cannot read)."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from pytest_depfence.errors import FenceUnavailable
from pytest_depfence.kernel import bpf_source_dir, tracing


def _c_text() -> str:
    return "".join(p.read_text() for p in bpf_source_dir().iterdir() if p.suffix in (".c", ".h"))


def _used_in_c() -> set[str]:
    return set(re.findall(r"\b(SYS_[A-Z0-9_]+|DEPFENCE_(?:REG|MODE)_[A-Z0-9_]+)\b", _c_text()))


def _optional_in_c() -> set[str]:
    """The syscalls the C uses only inside `#ifdef SYS_X ... #endif` (x86-64 has them,
    asm-generic has only their *at forms)."""
    blocks = re.findall(r"#ifdef SYS_[A-Z0-9_]+\n(.*?)#endif", _c_text(), re.DOTALL)
    return set(re.findall(r"\bSYS_[A-Z0-9_]+\b", "".join(blocks)))


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_every_syscall_name_the_c_uses_is_passed(machine):
    passed = {f[2:].split("=")[0] for f in tracing.syscall_cflags(machine)}
    optional = _optional_in_c()
    assert _used_in_c() - optional == passed - optional
    assert optional == {"SYS_OPEN", "SYS_CREAT", "SYS_RENAME", "SYS_LINK", "SYS_SYMLINK"}
    assert (optional <= passed) == (machine == "x86_64")


def test_an_unknown_architecture_is_refused_by_name():
    with pytest.raises(FenceUnavailable) as caught:
        tracing.syscall_cflags("riscv64")
    assert "not riscv64" in caught.value.reason


def _btf(structs: dict[str, list[tuple[str, int, int]]], filler: int = 3) -> bytes:
    """A BTF blob: `filler` INT types, then each struct with (member, bit offset, bitfield
    size) members (kind_flag set when any member is a bitfield)."""
    strings = b"\0"
    offs: dict[str, int] = {}

    def name(text: str) -> int:
        nonlocal strings
        if text not in offs:
            offs[text] = len(strings)
            strings += text.encode() + b"\0"
        return offs[text]

    types = b""
    for i in range(filler):
        types += struct.pack("<III", name(f"int{i}"), 1 << 24, 4) + struct.pack("<I", 32)
    for sname, members in structs.items():
        kflag = any(size for _, _, size in members)
        info = (int(kflag) << 31) | (4 << 24) | len(members)
        types += struct.pack("<III", name(sname), info, 64)
        for mname, bits, size in members:
            types += struct.pack("<III", name(mname), 1, (size << 24 | bits) if kflag else bits)
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return header + types + strings


FIELDS = {
    "task_struct": [
        ("state", 0, 0),
        ("pid", 1264 * 8, 0),
        ("tgid", 1268 * 8, 0),
        ("signal", 1904 * 8, 0),
    ],
    "signal_struct": [("sigcnt", 0, 0), ("live", 4 * 8, 0)],
    "cgroup": [("kn", 256 * 8, 0), ("root", 696 * 8, 0)],
    "kernfs_node": [("id", 96 * 8, 0)],
    "cgroup_root": [("hierarchy_id", 12 * 8, 0)],
}


def test_btf_offsets_are_read_from_the_structs(tmp_path: Path):
    blob = tmp_path / "vmlinux"
    blob.write_bytes(_btf(FIELDS))
    assert tracing.btf_offsets(blob) == {
        "OFF_TASK_PID": 1264,
        "OFF_TASK_TGID": 1268,
        "OFF_TASK_SIGNAL": 1904,
        "OFF_SIGNAL_LIVE": 4,
        "OFF_CGROUP_KN": 256,
        "OFF_CGROUP_ROOT": 696,
        "OFF_KERNFS_ID": 96,
        "OFF_ROOT_HIERARCHY_ID": 12,
    }


@pytest.mark.parametrize(
    "broken",
    [
        {**FIELDS, "task_struct": [("tgid", 1268 * 8, 0), ("signal", 1904 * 8, 0)]},  # no pid
        {**FIELDS, "kernfs_node": [("flags", 0, 0), ("id", 96 * 8, 16)]},  # a bitfield
        {**FIELDS, "cgroup_root": [("hierarchy_id", 12 * 8 + 4, 0)]},  # not byte-aligned
        {k: v for k, v in FIELDS.items() if k != "cgroup"},  # no struct cgroup
    ],
    ids=["missing member", "bitfield", "unaligned", "missing struct"],
)
def test_btf_that_does_not_give_every_offset_means_classic_tracepoints(tmp_path, broken):
    blob = tmp_path / "vmlinux"
    blob.write_bytes(_btf(broken))
    assert tracing.btf_offsets(blob) is None


FD_FIELDS = {
    "task_struct": [*FIELDS["task_struct"], ("files", 1824 * 8, 0)],
    "files_struct": [("count", 0, 0), ("fdt", 32 * 8, 0)],
    "fdtable": [("max_fds", 0, 0), ("fd", 8 * 8, 0)],
    "file": [("f_inode", 32 * 8, 0)],
    "inode": [("i_sb", 40 * 8, 0), ("i_ino", 64 * 8, 0)],
    "super_block": [("s_dev", 16 * 8, 0)],
}


def test_the_fd_to_inode_offsets_are_a_group_of_their_own(tmp_path, monkeypatch):
    blob = tmp_path / "vmlinux"
    blob.write_bytes(_btf({**FIELDS, **FD_FIELDS}))
    monkeypatch.setattr(tracing, "VMLINUX_BTF", blob)
    assert tracing.btf_offsets(blob, tracing.FD_FIELDS) == {
        "OFF_TASK_FILES": 1824,
        "OFF_FILES_FDT": 32,
        "OFF_FDTABLE_MAX_FDS": 0,
        "OFF_FDTABLE_FD": 8,
        "OFF_FILE_INODE": 32,
        "OFF_INODE_INO": 64,
        "OFF_INODE_SB": 40,
        "OFF_SB_DEV": 16,
    }
    assert "-DDEPFENCE_OFF_SB_DEV=16" in tracing.btf_cflags()
    # Without one of them only the descriptor check is off; the tracepoints stay raw.
    blob.write_bytes(_btf({**FIELDS, **{k: v for k, v in FD_FIELDS.items() if k != "file"}}))
    flags = tracing.btf_cflags()
    assert "-DDEPFENCE_NO_FD_INODE=1" in flags and "-DDEPFENCE_OFF_TASK_PID=1264" in flags
    assert "-DDEPFENCE_NO_BTF_OFFSETS=1" not in flags


def test_no_btf_or_a_foreign_file_means_classic_tracepoints(tmp_path, monkeypatch):
    assert tracing.btf_offsets(tmp_path / "absent") is None
    (tmp_path / "junk").write_bytes(b"\x7fELF" + bytes(64))
    assert tracing.btf_offsets(tmp_path / "junk") is None
    monkeypatch.setattr(tracing, "VMLINUX_BTF", tmp_path / "absent")
    assert tracing.btf_cflags() == ["-DDEPFENCE_NO_BTF_OFFSETS=1", "-DDEPFENCE_NO_FD_INODE=1"]
