"""What the proxy hands its judge, and what it needs back: the proxy's typed interface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

Transport = Literal["udp", "tcp"]


@dataclass(frozen=True)
class Query:
    """One DNS query as the proxy received it."""

    name: str  # qname as asked, lowercase, without trailing dot
    qtype: str  # "A", "AAAA", ... (dnslib QTYPE name; "TYPE65280" for unknown types)
    transport: Transport
    client: tuple[str, int]  # the peer (address, port) as the proxy saw it
    listen_port: int  # the proxy port it arrived on
    txid: int


class Verdict(Protocol):
    """What the proxy needs of a verdict: answer with the outage, and with which rcode."""

    @property
    def blocked(self) -> bool: ...

    @property
    def rcode(self) -> int | None: ...  # None: leave the query unanswered


V = TypeVar("V", bound=Verdict)


class DnsJudge(Protocol[V]):
    """Who decides for the proxy. Calls come from proxy threads, `observe` serialized.

    `query` judges the question before anything is forwarded; `answer` sees the
    upstream's answer to a query `query` let through, before the client does,
    and returns the verdict that stands; `observe` is told every query with a
    question exactly once, with its final verdict, before the client is answered.
    """

    def query(self, query: Query) -> V: ...

    def answer(self, query: Query, reply: bytes, verdict: V) -> V: ...

    def observe(self, query: Query, verdict: V) -> None: ...
