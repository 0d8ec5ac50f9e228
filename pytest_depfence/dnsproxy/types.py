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

    `query` judges the question before anything is forwarded. A blocked verdict
    is final: the query is never forwarded, and `observe` is told at once, before
    the outage answer and whatever the upstream is doing. Otherwise the query is
    forwarded and `answer` sees the upstream's answer before the client does and
    returns the verdict that stands (blocked: the client gets the verdict's rcode,
    not the answer; an answer the judge cannot read must come back blocked, and
    an exception from `answer` gives the client SERVFAIL); then `observe` is told,
    before the client is answered. An upstream that fails gives SERVFAIL, observed
    with `query`'s verdict. A query still waiting for the upstream when
    `DnsProxy.drain()` is called is observed by drain() with `query`'s verdict,
    and not again when its answer comes. So `observe` is told every query with a
    question exactly once, and never later than the drain() that follows it.
    """

    def query(self, query: Query) -> V: ...

    def answer(self, query: Query, reply: bytes, verdict: V) -> V: ...

    def observe(self, query: Query, verdict: V) -> None: ...
