"""What the proxy hands its judge, and what it needs back: the proxy's typed interface."""

from __future__ import annotations

from dataclasses import dataclass, field
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
    #: When the proxy read it (CLOCK_MONOTONIC ns; 0: not said): the query's time, though
    #: it is observed after its answer went out.
    received_ns: int = field(default=0, compare=False)


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
    is final: the query is never forwarded, its outage answer is sent, whatever the
    upstream is doing, and then `observe` is told. Otherwise the query is forwarded
    and `answer` sees the upstream's answer before the client does and returns the
    verdict that stands (blocked: the client gets the verdict's rcode, not the
    answer; an answer the judge cannot read must come back blocked, and an
    exception from `answer` gives the client SERVFAIL); the reply is sent, and then
    `observe` is told. An upstream that fails gives SERVFAIL, observed with
    `query`'s verdict. A query still waiting for the upstream when
    `DnsProxy.drain()` is called is observed by drain() with `query`'s verdict,
    and not again when its answer comes. So `observe` is told every query with a
    question exactly once, and never later than the drain() that follows it.

    `sender` is told each query `query` judged, once, before its reply is sent
    (for a forwarded query, while the upstream works on it): the moment to learn
    who sent it, before the client can ask again on the same flow.
    """

    def query(self, query: Query) -> V: ...

    def sender(self, query: Query) -> None: ...

    def answer(self, query: Query, reply: bytes, verdict: V) -> V: ...

    def observe(self, query: Query, verdict: V) -> None: ...
