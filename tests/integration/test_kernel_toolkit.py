"""When compiling or loading fails, the reason says what failed, with bcc's and the kernel's words.

Real compiles and loads with the machine's bcc (nothing attached): a define
missing from the -D list stops the compile at bpf/abi.h's guard; a program
the verifier rejects is blamed on the verifier, with its log; a program the
kernel refuses before verifying it is not.
"""

from __future__ import annotations

import os
from types import ModuleType

import pytest
from helpers_net import skip_or_fail

from pytest_depfence.errors import FenceUnavailable
from pytest_depfence.kernel import abi, program_text, toolkit

if os.geteuid() != 0:
    pytest.skip("loading programs needs root", allow_module_level=True)

#: f reads through a scalar (the verifier says no); g is fine but asks for the wrong attach type.
BAD = b"""
int f(struct __sk_buff *skb) { char *p = (char *)(long)skb->len; return *p; }
int g(struct __sk_buff *skb) { return 1; }
"""


@pytest.fixture(scope="module")
def bcc(pytestconfig: pytest.Config) -> ModuleType:
    try:
        toolkit.preflight()
        return toolkit.import_bcc()
    except FenceUnavailable as exc:
        skip_or_fail(pytestconfig, exc)


def test_a_missing_define_stops_the_compile_at_its_guard(bcc: ModuleType) -> None:
    flags = [f for f in abi.cflags() if not f.startswith("-DDNS_NAME_MAX=")]
    with pytest.raises(FenceUnavailable) as caught:
        toolkit.compile_programs(bcc, program_text(), flags)
    assert "could not compile the eBPF programs" in caught.value.reason
    assert '"DNS_NAME_MAX is not defined: pass the -D flags of' in caught.value.reason
    assert caught.value.fix


def test_a_verifier_rejection_is_blamed_on_the_verifier_with_its_log(bcc: ModuleType) -> None:
    bpf = bcc.BPF(text=BAD)
    with pytest.raises(FenceUnavailable) as caught:
        toolkit.load_program(bpf, "f", toolkit.PROG_TYPE_CGROUP_SKB, toolkit.ATTACH_TYPES["egress"])
    reason = caught.value.reason
    assert reason.startswith("the kernel's verifier rejected the f program")
    assert "invalid mem access" in reason  # the verifier's own words
    assert "processed" in reason and "insns" in reason


def test_a_refusal_before_verifying_does_not_blame_the_verifier(bcc: ModuleType) -> None:
    bpf = bcc.BPF(text=BAD)
    connect4 = toolkit.ATTACH_TYPES["connect4"]  # not an attach type of a cgroup_skb program
    with pytest.raises(FenceUnavailable) as caught:
        toolkit.load_program(bpf, "g", toolkit.PROG_TYPE_CGROUP_SKB, connect4)
    reason = caught.value.reason
    assert reason.startswith("loading the g program failed: ")
    assert "Invalid argument" in reason
    assert "verifier" not in reason
