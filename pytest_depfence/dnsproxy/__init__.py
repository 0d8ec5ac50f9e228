"""The per-fence DNS proxy: where a fenced process's DNS query is answered.

The eBPF programs redirect every port-53 query of a fence (UDP connected and
unconnected, TCP, IPv4 and IPv6) to this proxy on loopback. It reads each
query's question, asks its judge (`DnsJudge`) for a verdict, answers a blocked
name with the verdict's outage rcode itself, forwards the rest upstream byte for
byte, hands the answer to the judge before the client sees it, and turns
anything that goes wrong upstream into SERVFAIL, never silence. Judging never
waits for the upstream, nor does `drain()`.
It knows nothing of policies, BPF maps or pytest.

- `types`: `Query` and the `DnsJudge` interface;
- `wire`: reading questions and building replies;
- `listeners`: the loopback sockets; `connection`: one TCP client;
- `forwarder`: UDP queries over one persistent upstream socket, answers matched
  back by id and question; `upstream`: a TCP query's own connection upstream;
- `tickets`: each query's progress, what `drain()` waits for;
- `tcp`: TCP clients, a reader thread each, their queries forwarded on a pool;
- `loop`: the one event loop thread that serves every proxy of the process;
- `proxy`: `DnsProxy`, its handlers on that loop (all of UDP) and its answering;
- `drain`: `drain()`, how a fence knows every query of a run has been observed;
- `parking`: a closed fence's proxy, kept for the next fence in its network namespace.
"""

from .proxy import DnsProxy
from .types import DnsJudge, Query, Transport, Verdict

__all__ = ["DnsJudge", "DnsProxy", "Query", "Transport", "Verdict"]
