"""The C<->Python contract without a kernel: struct sizes, the -D list, the name hash.

The sizes pinned here are the C's (checked against the loaded programs by
tests/integration/test_kernel_contract.py); a change to either side shows up
here first. The -D list is checked against the C sources as text: every name
bpf/ guards with `#ifndef X` + `#error` is one abi.py defines, and none is
given a value in C.
"""

from __future__ import annotations

import ctypes
import ipaddress
import re
from pathlib import Path

import pytest

from pytest_depfence.kernel import abi, bpf_source_dir
from pytest_depfence.outages import KERNEL_ACTIONS

GUARD = re.compile(r"^#ifndef (\w+)\n#error\b", re.MULTILINE)


def c_sources() -> dict[str, str]:
    src = bpf_source_dir()
    return {p.name: p.read_text() for p in sorted(src.iterdir()) if p.suffix in (".c", ".h")}


def guarded_names() -> list[str]:
    return [name for text in c_sources().values() for name in GUARD.findall(text)]


# --------------------------------------------------------------------------- structs


@pytest.mark.parametrize(
    ("struct", "size"),
    [
        (abi.EventHead, 48),
        (abi.ConnEventStruct, 56),
        (abi.BypassEventStruct, 192),
        (abi.ViewEventStruct, 16),
        (abi.EscapeEventStruct, 296),
        (abi.UnixEventStruct, 184),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else str(v),
)
def test_struct_sizes_are_pinned(struct, size):
    assert ctypes.sizeof(struct) == size


def test_both_events_start_with_the_same_head():
    for struct in (abi.ConnEventStruct, abi.BypassEventStruct):
        assert struct._fields_[0] == ("head", abi.EventHead)
        assert struct.head.offset == 0


def test_no_struct_has_implicit_padding():
    # Every byte is a named field, so what C leaves uninitialised cannot be read as data.
    for _, struct in abi.RINGS.values():
        named = sum(getattr(struct, f[0]).size for f in struct._fields_)
        assert named == ctypes.sizeof(struct), struct.__name__
    named = sum(getattr(abi.EventHead, f[0]).size for f in abi.EventHead._fields_)
    assert named == ctypes.sizeof(abi.EventHead)


def test_every_ring_struct_is_a_field_of_the_check_map():
    text = c_sources()["depfence.c"]
    body = re.search(r"struct abi_check \{(.*?)\};", text, re.DOTALL)
    assert body is not None
    fields = re.findall(r"struct (\w+) (\w+);", body.group(1))
    c_names = {
        "conn": "conn_event",
        "bypass": "bypass_event",
        "view": "view_event",
        "escape": "escape_event",
        "unix_connect": "unix_event",
    }
    assert sorted(fields) == sorted((c_names[f], f) for f, _ in abi.RINGS.values())


def test_layout_mismatches_names_a_moved_field():
    class Swapped(ctypes.Structure):
        _fields_ = [
            ("head", abi.EventHead),
            ("where", ctypes.c_uint8),
            ("action", ctypes.c_uint8),
            ("pad", ctypes.c_uint8 * 6),
        ]

    assert abi.layout_mismatches(abi.ConnEventStruct, abi.ConnEventStruct) == []
    found = abi.layout_mismatches(abi.ConnEventStruct, Swapped)
    assert found == [
        "ConnEventStruct.action: offset 48 size 1 here, offset 49 size 1 in C",
        "ConnEventStruct.where: offset 49 size 1 here, offset 48 size 1 in C",
    ]


# --------------------------------------------------------------------------- the -D list


def test_defines_have_no_duplicate_names():
    names = [name for name, _ in abi.defines()]
    assert len(names) == len(set(names))
    flags = abi.cflags()
    assert len(flags) == len(set(flags)) == len(names)
    assert all(re.fullmatch(r"-D\w+=\w+", f) for f in flags)


def test_every_name_the_c_guards_is_defined_and_every_define_is_guarded():
    guarded = guarded_names()
    assert len(guarded) == len(set(guarded)), "a name is guarded twice"
    assert sorted(guarded) == sorted(name for name, _ in abi.defines())


def test_the_c_gives_no_contract_name_a_value_of_its_own():
    defined = {name for name, _ in abi.defines()}
    for file, text in c_sources().items():
        own = set(re.findall(r"^\s*#\s*define\s+(\w+)", text, re.MULTILINE))
        assert not own & defined, f"{file} defines {sorted(own & defined)} itself"


@pytest.mark.parametrize(
    "family", [abi.FenceFlag, abi.Verdict, abi.Action, abi.At, abi.ProcFlag, abi.Unjudged]
)
def test_codes_within_a_family_are_distinct(family):
    values = [int(m) for m in family.__members__.values()]
    assert len(values) == len(set(values)) and 0 not in values


def test_flags_are_single_bits():
    for family in (abi.FenceFlag, abi.ProcFlag):
        for member in family.__members__.values():
            assert int(member) & (int(member) - 1) == 0


def test_outage_codes_follow_the_outage_table():
    assert abi.OUTAGE_CODES == {name: i for i, name in enumerate(KERNEL_ACTIONS)}
    defines = dict(abi.defines())
    for name, code in abi.OUTAGE_CODES.items():
        assert defines[f"OUTAGE_{name.upper()}"] == str(code)


def test_sizes_used_as_masks_are_powers_of_two():
    for size in (abi.DNS_NAME_MAX, abi.DNS_LABELS_MAX):
        assert size & (size - 1) == 0


def test_name_kinds_cover_the_policy_rule_kinds():
    assert set(abi.NAME_KINDS) == {"name", "subdomains"}


# --------------------------------------------------------------------------- names


def reference_hash(wire: bytes) -> int:
    """bypass.c's loop, spelled as the C does it: from the final zero back, times MUL plus c."""
    value = 0
    for byte in reversed(wire):
        value = (value * abi.NAME_HASH_MUL + byte) % 2**64
    return value


@pytest.mark.parametrize(
    ("name", "wire"),
    [
        ("github.com", b"\x06github\x03com\x00"),
        ("GitHub.COM", b"\x06github\x03com\x00"),
        ("github.com.", b"\x06github\x03com\x00"),
        ("a.b.c", b"\x01a\x01b\x01c\x00"),
        ("", b"\x00"),
        ("x" * 63 + ".test", b"\x3f" + b"x" * 63 + b"\x04test\x00"),
    ],
)
def test_to_wire(name, wire):
    assert abi.to_wire(name) == wire


def test_name_hash_is_the_hash_of_the_lowercase_wire_form():
    assert abi.name_hash("github.com") == reference_hash(b"\x06github\x03com\x00")
    same = {abi.name_hash(n) for n in ("GitHub.Com", "github.com", "github.com.")}
    assert same == {abi.name_hash("github.com")}
    assert abi.name_hash("") == 0  # the root: one zero byte


def test_name_hash_is_label_bounded():
    # The suffix "github.com" of "notgithub.com" is not at a label start: other bytes.
    assert abi.name_hash("notgithub.com") != abi.name_hash("github.com")
    assert abi.name_hash("hub.com") != abi.name_hash("github.com")
    # The hash of a name is the hash of that suffix of a longer name's wire form.
    wire = abi.to_wire("api.github.com")
    assert reference_hash(wire[4:]) == abi.name_hash("github.com")


def test_name_hash_fits_64_bits_for_the_longest_judged_name():
    labels = ["a" * 63, "b" * 62]
    name = ".".join(labels)
    assert len(abi.to_wire(name)) == abi.DNS_NAME_MAX
    assert 0 <= abi.name_hash(name) < 2**64


@pytest.mark.parametrize(
    "name", ["github.com", "a.b.c.d.e.f", "x" * 63 + ".example", "", "xn--bcher-kva.example"]
)
def test_wire_name_reads_back_what_to_wire_wrote(name):
    assert abi.wire_name(abi.to_wire(name)) == name


def test_wire_name_stops_at_the_final_zero_and_at_the_end():
    assert abi.wire_name(b"\x03api\x06github\x03com\x00\x00\x01\x00\x01") == "api.github.com"
    assert abi.wire_name(b"\x03api\x06git") == "api.git"  # cut short: what there is


def test_addresses_round_trip_through_the_mapped_form():
    v4 = ipaddress.ip_address("10.77.1.1")
    v6 = ipaddress.ip_address("fd77::1:1")
    assert abi.mapped(v4) == bytes(10) + b"\xff\xff" + v4.packed
    assert abi.unmapped(abi.mapped(v4)) == v4
    assert abi.unmapped(abi.mapped(v6)) == v6


def test_every_unjudged_reason_has_a_text_and_fits_below_the_walks_own_stop():
    assert set(abi.UNJUDGED_TEXTS) == set(abi.Unjudged)
    # bypass.c's label walk stops with STOP_END (0x80) or a reason, read back as stop & 0x7f.
    assert all(0 < int(reason) < 0x80 for reason in abi.Unjudged)


def test_decode_bypass_says_why_a_query_was_not_judged():
    raw = abi.BypassEventStruct()
    ctypes.memmove(raw.head.ip6, abi.mapped(ipaddress.ip_address("10.77.0.53")), 16)
    raw.head.port, raw.head.proto, raw.qtype, raw.txid = 5300, 17, 1, 7
    wire = abi.to_wire("api.github.com")
    ctypes.memmove(raw.name, wire, len(wire))
    raw.name_len = len(wire)
    judged = abi.decode_bypass(raw)
    assert (judged.name, judged.unjudged, judged.qtype, judged.txid) == (
        "api.github.com",
        None,
        1,
        7,
    )
    raw.unjudged, raw.name_len = abi.Unjudged.POINTER, 4  # read up to the pointer: "api"
    unjudged = abi.decode_bypass(raw)
    assert (unjudged.name, unjudged.unjudged) == ("api", abi.UNJUDGED_TEXTS[abi.Unjudged.POINTER])


def test_decode_conn_reads_every_field():
    raw = abi.ConnEventStruct()
    raw.head.ts, raw.head.cgid, raw.head.pid, raw.head.tid = 5, 77, 100, 101
    ctypes.memmove(raw.head.ip6, abi.mapped(ipaddress.ip_address("10.77.1.1")), 16)
    raw.head.port, raw.head.proto = 443, 6
    raw.action, raw.where = abi.Action.RESET, abi.At.CONNECT
    event = abi.decode_conn(raw)
    assert (event.time_ns, event.cgroup_id, event.pid, event.tid) == (5, 77, 100, 101)
    assert (str(event.address), event.port, event.protocol) == ("10.77.1.1", 443, "tcp")
    assert (event.action, event.where) == ("reset", "connect")
    raw.action, raw.head.proto = 99, 200
    assert (abi.decode_conn(raw).action, abi.decode_conn(raw).protocol) == ("99", "200")


def test_decode_argv_cuts_each_slot_at_its_nul():
    raw = bytearray(abi.ARGC * abi.ARGLEN)
    raw[0:4] = b"curl"
    raw[abi.ARGLEN : abi.ARGLEN + 2] = b"-s"
    assert abi.decode_argv(bytes(raw), 2) == ("curl", "-s")
    assert len(abi.decode_argv(bytes(raw), 99)) == abi.ARGC


def test_the_sources_are_found_beside_the_package():
    assert (bpf_source_dir() / "abi.h").is_file()
    assert Path(bpf_source_dir(), "depfence.c").is_file()


def test_each_process_hashes_names_with_a_multiplier_of_its_own() -> None:
    """A multiplier known in advance lets a forbidden name be computed that hashes like an
    allowed one (bypass.c trusts the hash); one drawn per process cannot be aimed at."""
    import subprocess
    import sys

    code = "from pytest_depfence.kernel import abi; print(abi.NAME_HASH_MUL)"
    drawn = {
        int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, timeout=60).stdout)
        for _ in range(3)
    }  # fmt: skip
    assert len(drawn) == 3 and all(m % 2 == 1 for m in drawn)
