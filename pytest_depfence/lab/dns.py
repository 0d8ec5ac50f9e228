"""The lab's authoritative DNS: the zone data and answers, served over UDP and TCP.

dnslib parses and builds the messages; the answer for every lab name (and
NODATA / NXDOMAIN with the closest zone's SOA for the rest) is decided in
``_Zone.answer``.
"""

from __future__ import annotations

import logging
import socket
import socketserver
from typing import Any, cast

from dnslib import AAAA, CNAME, EDNS0, QTYPE, RCODE, RR, SOA, A, DNSError, DNSRecord

from .hosts import _LAB_CNAMES, _LAB_ZONES, LabHost
from .servers import _ConnectionThreads, _family_of

log = logging.getLogger(__name__)

TTL = 60


class _Zone:
    """The authoritative data of the lab DNS and the answer logic."""

    def __init__(self, hosts: dict[str, LabHost]) -> None:
        self.hosts = hosts
        self.cnames = dict(_LAB_CNAMES)
        names = set(hosts) | set(self.cnames) | set(_LAB_ZONES)
        # Empty non-terminals (githubusercontent.com, internal, com) exist: NODATA, not NXDOMAIN.
        self.existing = set(names)
        for name in names:
            labels = name.split(".")
            for i in range(1, len(labels)):
                self.existing.add(".".join(labels[i:]))

    @staticmethod
    def _zone_of(name: str) -> str:
        best = ""
        for zone in _LAB_ZONES:
            if (name == zone or name.endswith("." + zone)) and len(zone) > len(best):
                best = zone
        return best + "."

    def _soa(self, name: str) -> Any:
        zone = self._zone_of(name)
        soa = SOA("ns.depfence-lab.", "hostmaster.depfence-lab.", (1, 3600, 600, 86400, TTL))
        return RR(zone, QTYPE.SOA, ttl=TTL, rdata=soa)

    def answer(self, data: bytes) -> bytes | None:
        """The wire reply to one wire query, or None for garbage that deserves no answer."""
        try:
            request = DNSRecord.parse(data)
        except (DNSError, ValueError, IndexError):
            return None
        if request.header.qr:
            return None
        reply = request.reply(ra=1, aa=1)
        reply.header.ad = 0  # copied from the query's flags; the lab validates nothing
        reply.header.tc = 0
        if any(rr.rtype == QTYPE.OPT for rr in request.ar):
            reply.add_ar(EDNS0(udp_len=1232))
        if request.header.opcode != 0:
            reply.header.rcode = RCODE.NOTIMP
            return cast(bytes, reply.pack())
        if not request.questions:
            reply.header.rcode = RCODE.FORMERR
            return cast(bytes, reply.pack())
        question = request.q
        if question.qclass not in (1, 255):  # IN, ANY
            reply.header.rcode = RCODE.REFUSED
            return cast(bytes, reply.pack())

        qtype = question.qtype
        # The first owner is the question's name as sent: its case is echoed.
        owner: Any = question.qname
        current = b".".join(question.qname.label).decode("ascii", "replace").lower()
        for _ in range(8):  # bounded CNAME chase
            target = self.cnames.get(current)
            if target is None:
                break
            reply.add_answer(RR(owner, QTYPE.CNAME, ttl=TTL, rdata=CNAME(target + ".")))
            if qtype == QTYPE.CNAME:
                return cast(bytes, reply.pack())
            owner, current = target + ".", target

        host = self.hosts.get(current)
        if host is not None:
            added = False
            if qtype in (QTYPE.A, QTYPE.ANY):
                reply.add_answer(RR(owner, QTYPE.A, ttl=TTL, rdata=A(host.ipv4)))
                added = True
            if qtype in (QTYPE.AAAA, QTYPE.ANY):
                reply.add_answer(RR(owner, QTYPE.AAAA, ttl=TTL, rdata=AAAA(host.ipv6)))
                added = True
            if not added:
                reply.add_auth(self._soa(current))
        elif current in self.existing or current == "":
            reply.add_auth(self._soa(current))
        else:
            reply.header.rcode = RCODE.NXDOMAIN
            reply.add_auth(self._soa(current))
        return cast(bytes, reply.pack())


class _DNSUDPServer(socketserver.UDPServer):
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], zone: _Zone) -> None:
        self.address_family = _family_of(address[0])
        self.zone = zone
        super().__init__(address, _DNSUDPHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("lab dns: error answering %s", client_address, exc_info=True)


class _DNSUDPHandler(socketserver.BaseRequestHandler):
    server: _DNSUDPServer

    def handle(self) -> None:
        data, sock = cast(tuple[bytes, socket.socket], self.request)
        reply = self.server.zone.answer(data)
        if reply is not None:
            sock.sendto(reply, self.client_address)


class _DNSTCPServer(_ConnectionThreads, socketserver.ThreadingTCPServer):
    label = "dns"
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], zone: _Zone) -> None:
        self.address_family = _family_of(address[0])
        self.zone = zone
        super().__init__(address, _DNSTCPHandler)


class _DNSTCPHandler(socketserver.StreamRequestHandler):
    server: _DNSTCPServer
    timeout = 30  # an idle client does not hold a thread forever

    def handle(self) -> None:
        while True:  # several length-prefixed queries may share a connection
            prefix = self.rfile.read(2)
            if len(prefix) < 2:
                return
            size = int.from_bytes(prefix, "big")
            data = self.rfile.read(size)
            if len(data) < size:
                return
            reply = self.server.zone.answer(data)
            if reply is None:
                return
            self.wfile.write(len(reply).to_bytes(2, "big") + reply)
            self.wfile.flush()
