"""What a blocked host looks like to the script: every outage, defined once.

An outage either happens in DNS (the proxy answers a blocked name with an
rcode, or never answers) or at connect time (the name resolves, and the kernel
makes every connection to its addresses fail one way). Help texts, choices,
the proxy's answer and the kernel's code all come from `OUTAGES`; adding an
outage is a row here, plus its C action when it is a kernel-level one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Layer = Literal["dns", "connect"]

#: What the kernel does to a connection or datagram the policy refuses, by code (OUTAGE_*
#: in the C programs, passed as -D defines): the code of each is its index here.
KERNEL_ACTIONS = ("refuse", "reset", "blackhole")


@dataclass(frozen=True)
class Outage:
    name: str
    layer: Layer
    #: The proxy's answer to a blocked name: an rcode, or None for no answer at all.
    #: Connect-level outages let the name resolve (rcode unused).
    rcode: int | None
    #: What a refused connection meets in the kernel (a KERNEL_ACTIONS entry).
    kernel: str
    help: str

    @property
    def kernel_code(self) -> int:
        return KERNEL_ACTIONS.index(self.kernel)


OUTAGES: dict[str, Outage] = {
    o.name: o
    for o in (
        Outage("nxdomain", "dns", 3, "refuse", "the name does not exist"),
        Outage("servfail", "dns", 2, "refuse", "DNS answers SERVFAIL"),
        Outage("refused", "dns", 5, "refuse", "DNS answers REFUSED"),
        Outage("timeout", "dns", None, "refuse", "the query is never answered"),
        Outage(
            "reset",
            "connect",
            None,
            "reset",
            "the name resolves; connections to it are refused at once (ECONNREFUSED)",
        ),
        Outage(
            "blackhole",
            "connect",
            None,
            "blackhole",
            "the name resolves; its packets vanish, as when a host is down",
        ),
    )
}
DEFAULT = "nxdomain"


def choices_help() -> str:
    """Every outage with what the script meets, for help texts."""
    return "; ".join(f"{o.name}: {o.help}" for o in OUTAGES.values())
