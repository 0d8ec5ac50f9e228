"""The policy language: egress patterns, name normalization, and allow/block decisions.

This module owns what a pattern such as ``github.com``, ``*.github.com``,
``140.82.112.0/20``, ``local:3128`` or ``unix:/run/docker.sock`` means, how
names off the wire are normalized before they are compared, and the
allow/block decision of a ``no_egress`` or ``egress_only`` policy. It knows
nothing about DNS packets, BPF maps or pytest; the judge asks it, and it
answers.
"""

from __future__ import annotations

import encodings.idna
import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal, Union
from urllib.parse import urlsplit

from pytest_depfence.errors import PolicyError

__all__ = [
    "Decision",
    "Policy",
    "PolicyKind",
    "Rule",
    "RuleKind",
    "normalize_name",
    "parse_network",
    "parse_pattern",
    "unmap",
]

#: "local": a port of any local address (``local:3128``); "unix": a unix socket's path
#: (``unix:/run/docker.sock``, ``unix:@abstract``). Both judge contacts with local
#: services, never a name or an address.
RuleKind = Literal["name", "subdomains", "network", "local", "unix"]
PolicyKind = Literal["no_egress", "egress_only"]

_Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
_Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
_AddressLike = Union[str, ipaddress.IPv4Address, ipaddress.IPv6Address]
_Fail = Callable[[str], PolicyError]

# Limits from RFC 1035 §2.3.4, measured on the ASCII (IDNA) form without the root dot.
_MAX_LABEL = 63
_MAX_NAME = 253
# Underscore is allowed because service names (_dmarc, _acme-challenge) are real queries.
_LABEL_RE = re.compile(r"[a-z0-9_-]+")
_BAD_CHAR_RE = re.compile(r"[^a-z0-9_-]")
_V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def unmap(address: _Address) -> _Address:
    """IPv4-mapped IPv6 (::ffff:a.b.c.d) as its IPv4 address; other addresses unchanged."""
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; judging them as
    # IPv6 would let an IPv4 blocklist entry be bypassed through an AF_INET6 socket.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _to_address(address: _AddressLike) -> _Address:
    if isinstance(address, str):
        return ipaddress.ip_address(address)
    return address


def normalize_name(name: str) -> str:
    """Normalize a DNS name seen on the wire so that it compares equal to a rule's name.

    Lowercase, one trailing dot removed, non-ASCII labels IDNA-encoded. Never
    raises: a label the IDNA codec refuses is kept as lowercased text, which can
    still be compared (and will simply not equal any valid rule label).
    """
    raw: object = name
    if not isinstance(raw, str):
        # The proxy may hand over a dnslib label instead of its text; judge the
        # text rather than crash the thread that answers DNS.
        name = str(raw)
    if name.endswith("."):
        name = name[:-1]
    if name.isascii():
        return name.lower()
    labels = []
    for label in name.split("."):
        if label.isascii():
            labels.append(label.lower())
            continue
        try:
            labels.append(encodings.idna.ToASCII(label).decode("ascii"))
        except Exception:  # noqa: BLE001 - the codec's failure modes are not a documented closed set; names off the wire must never crash the proxy
            labels.append(label.lower())
    return ".".join(labels)


def _name_matches(normalized: str, kind: RuleKind, rule_name: str) -> bool:
    # Comparing against "." + rule_name keeps matches label-bounded:
    # "evilgithub.com" does not end with ".github.com".
    if kind == "name":
        return normalized == rule_name or normalized.endswith("." + rule_name)
    if kind == "subdomains":
        return normalized.endswith("." + rule_name)
    return False


@dataclass(frozen=True)
class Rule:
    """One parsed pattern.

    ``pattern`` is kept exactly as the user wrote it, for messages; ``name`` and
    ``network`` are what matching uses.
    """

    pattern: str
    kind: RuleKind
    name: str | None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    source: str | None = None
    #: The local service a "local" rule (its port, as text) or a "unix" rule (its path) names.
    endpoint: str | None = None
    #: The ranges file (as shown) a network rule was read from (`pytest_depfence.ranges`).
    file: str | None = None

    @property
    def key(self) -> tuple[str, str | None, _Network | None]:
        """What makes two rules the same rule ("GitHub.com" and "github.com.")."""
        return (self.kind, self.name or self.endpoint, self.network)

    def matches_name(self, name: str) -> bool:
        """Whether a DNS name (as received, any case, trailing dot or not) falls under this rule.

        Address rules never match a name. Never raises, whatever the input.
        """
        if self.name is None:
            return False
        return _name_matches(normalize_name(name), self.kind, self.name)

    def matches_address(self, address: _AddressLike) -> bool:
        """Whether an address lies in this rule's network.

        IPv4-mapped IPv6 addresses are judged as their IPv4 address. Name rules
        never match an address here (addresses learned from DNS answers are the
        fence's business). Raises ValueError for a string that is not an address.
        """
        if self.network is None:
            return False
        return unmap(_to_address(address)) in self.network


@dataclass(frozen=True)
class Decision:
    """The verdict on one name or address.

    ``rule`` is the rule that decided: under no_egress the rule that blocked,
    under egress_only the rule that allowed. It is None when no rule was
    involved (allowed under no_egress; blocked under egress_only; loopback).
    """

    blocked: bool
    rule: Rule | None


@dataclass(frozen=True)
class Policy:
    """A blocklist (``no_egress``) or an allowlist (``egress_only``) of parsed rules."""

    kind: PolicyKind
    rules: tuple[Rule, ...]
    _names: tuple[Rule, ...] = field(init=False, repr=False, compare=False, default=())
    _networks: _NetworkIndex = field(
        init=False, repr=False, compare=False, default_factory=lambda: _NetworkIndex(())
    )

    def __post_init__(self) -> None:
        if self.kind not in ("no_egress", "egress_only"):
            raise ValueError(f"policy kind must be 'no_egress' or 'egress_only', not {self.kind!r}")
        # A list would make the frozen policy unhashable and shareable-by-mutation.
        object.__setattr__(self, "rules", tuple(self.rules))
        # A ranges file adds thousands of network rules; names are judged on every query
        # and must not walk them (kept in order: the first matching rule decides).
        object.__setattr__(self, "_names", tuple(r for r in self.rules if r.name is not None))
        object.__setattr__(self, "_networks", _NetworkIndex(self.rules))

    @classmethod
    def no_egress(cls, *patterns: str, source: str | None = None) -> Policy:
        """Block the listed names (and everything below them) and networks; allow the rest."""
        if not patterns:
            # An empty blocklist would pass every test silently, which is never what was meant.
            raise PolicyError("no_egress()", "no_egress needs at least one pattern", source)
        return cls("no_egress", _parse_all(patterns, source))

    @classmethod
    def egress_only(cls, *patterns: str, source: str | None = None) -> Policy:
        """Allow only the listed names and networks (and loopback); block the rest.

        With no patterns every name is blocked, which is a meaningful policy
        ("this deploy needs no network at all").
        """
        return cls("egress_only", _parse_all(patterns, source))

    def with_rules(self, rules: Iterable[Rule]) -> Policy:
        """This policy with `rules` added after its own (ranges files' networks, say); a rule
        it already has keeps its first spelling and source."""
        seen = {rule.key for rule in self.rules}
        added = []
        for rule in rules:
            if rule.key not in seen:
                seen.add(rule.key)
                added.append(rule)
        return Policy(self.kind, (*self.rules, *added)) if added else self

    def check_name(self, name: str) -> Decision:
        """Decide a DNS name as received off the wire. Never raises."""
        normalized = normalize_name(name)
        for rule in self._names:
            if rule.name is not None and _name_matches(normalized, rule.kind, rule.name):
                return Decision(blocked=self.kind == "no_egress", rule=rule)
        return Decision(blocked=self.kind == "egress_only", rule=None)

    def check_address(self, address: _AddressLike) -> Decision:
        """Decide an address against the address rules only.

        Loopback is never blocked, under either kind: local services must stay
        reachable, and the fence's own DNS proxy lives there. Raises ValueError
        for a string that is not an address.
        """
        ip = unmap(_to_address(address))
        if ip.is_loopback:
            return Decision(blocked=False, rule=None)
        rule = self._networks.first(ip)
        if rule is not None:
            return Decision(blocked=self.kind == "no_egress", rule=rule)
        return Decision(blocked=self.kind == "egress_only", rule=None)

    def check_local(self, protocol: str, port: int | None, path: str | None) -> Decision:
        """Decide a contact with a local service: a TCP/UDP `port` of a local address, or
        (protocol "unix") the socket at `path`, against the local:/unix: rules only.

        A matching rule blocks it under no_egress and allows it under egress_only; with
        none, egress_only blocks it (the judge lets a fenced service through first).
        `path` is the socket's real path (symlinks resolved: /var/run/docker.sock is
        /run/docker.sock); a rule matches it as written or resolved alike.
        """
        for rule in self.rules:
            if rule.kind == "unix" and protocol == "unix" and path in _socket_paths(rule):
                return Decision(blocked=self.kind == "no_egress", rule=rule)
            if rule.kind == "local" and protocol != "unix" and rule.endpoint == str(port):
                return Decision(blocked=self.kind == "no_egress", rule=rule)
        return Decision(blocked=self.kind == "egress_only", rule=None)

    def describe(self) -> str:
        """The policy as it would be written, e.g. ``no_egress("github.com", "*.example.org")``;
        rules read from ranges files are counted per file, not listed:
        ``no_egress("github.com") + ranges from tests/github-meta.json (4821)``."""
        written = ", ".join(_quote(rule.pattern) for rule in self.rules if rule.file is None)
        files: dict[str, int] = {}
        for rule in self.rules:
            if rule.file is not None:
                files[rule.file] = files.get(rule.file, 0) + 1
        ranges = "".join(f" + ranges from {file} ({count})" for file, count in files.items())
        return f"{self.kind}({written}){ranges}"

    def rule_text(self, rule: Rule) -> str:
        """One rule as shown in a violation report, with where it came from when known."""
        where = f" [{rule.source}]" if rule.source else ""
        return f"{self.kind}({_quote(rule.pattern)}){where}"

    def explain(self, rule: Rule | None) -> str:
        """Why something was forbidden, for a report: the rule that decided, or (egress_only,
        no rule allowed it) the whole allowlist, with its source when every rule shares one."""
        if rule is not None:
            return self.rule_text(rule)
        sources = {r.source for r in self.rules}
        if len(sources) == 1 and None not in sources:
            return f"{self.describe()} [{sources.pop()}]"
        return self.describe()


class _NetworkIndex:
    """The network rules by (version, prefix length, network): the first rule (in policy
    order) containing an address, found in one lookup per prefix length in use rather
    than one test per rule (a ranges file adds thousands)."""

    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self._tables: dict[tuple[int, int], dict[int, tuple[int, Rule]]] = {}
        for order, rule in enumerate(rules):
            if rule.network is None:
                continue
            net = rule.network
            table = self._tables.setdefault((net.version, net.prefixlen), {})
            table.setdefault(int(net.network_address), (order, rule))

    def first(self, ip: _Address) -> Rule | None:
        best: tuple[int, Rule] | None = None
        value, bits = int(ip), ip.max_prefixlen
        for (version, prefixlen), table in self._tables.items():
            if version != ip.version:
                continue
            mask = ((1 << prefixlen) - 1) << (bits - prefixlen)
            found = table.get(value & mask)
            if found is not None and (best is None or found[0] < best[0]):
                best = found
        return best[1] if best is not None else None


def _socket_paths(rule: Rule) -> set[str | None]:
    """A unix rule's path as written and, for a filesystem path, as the machine resolves
    it now (the one place the policy looks at files: a socket path is only comparable
    once its symlinks are resolved)."""
    if rule.endpoint is None or rule.endpoint.startswith("@"):
        return {rule.endpoint}
    return {rule.endpoint, os.path.realpath(rule.endpoint)}


def _quote(pattern: str) -> str:
    # Double quotes so the text reads like the marker call the user wrote.
    return f'"{pattern}"'


def _parse_all(patterns: tuple[object, ...], source: str | None) -> tuple[Rule, ...]:
    rules: list[Rule] = []
    seen: set[tuple[str, str | None, _Network | None]] = set()
    for pattern in patterns:
        rule = parse_pattern(pattern, source)
        # "GitHub.com" and "github.com." are the same rule; the first spelling is kept for messages.
        if rule.key not in seen:
            seen.add(rule.key)
            rules.append(rule)
    return tuple(rules)


def parse_pattern(pattern: object, source: str | None = None) -> Rule:
    """Parse one pattern strictly.

    Raises PolicyError naming the value and ``source`` for anything outside
    the policy language.
    """
    if not isinstance(pattern, str):
        if isinstance(pattern, (list, tuple, set, frozenset)):
            reason = f"pass each pattern as its own argument, not a {type(pattern).__name__}"
        else:
            reason = f"a pattern must be a string, not {type(pattern).__name__}"
        raise PolicyError(repr(pattern), reason, source)

    def fail(reason: str) -> PolicyError:
        return PolicyError(pattern, reason, source)

    if not pattern:
        raise fail("empty pattern")
    if any(ch.isspace() for ch in pattern):
        raise fail("contains whitespace")
    if "://" in pattern:
        host = urlsplit(pattern).hostname
        hint = f"; write just the host name, e.g. {host!r}" if host else ""
        raise fail(f"a URL is not a pattern{hint}")
    if "%" in pattern:
        raise fail("zone ids ('%eth0') are not part of a pattern")
    if pattern.startswith(("local:", "unix:")):
        return _local_rule(pattern, source, fail)

    if "/" in pattern:
        return _parse_network(pattern, source)
    try:
        address = ipaddress.ip_address(pattern)
    except ValueError:
        pass
    else:
        return _network_rule(pattern, ipaddress.ip_network(address), source)

    if pattern.startswith("["):
        raise fail("write IPv6 addresses without brackets (and without a port)")
    if ":" in pattern:
        if pattern.rsplit(":", 1)[1].isdigit():
            raise fail("a port is not part of a pattern; write the host alone")
        raise fail("':' is only allowed in an IPv6 address")

    if "*" in pattern:
        if pattern == "*":
            raise fail(
                "a bare '*' is not allowed; egress_only() with no patterns blocks every name"
            )
        rest = pattern[2:]
        if not pattern.startswith("*.") or "*" in rest:
            raise fail("'*' is only allowed as a whole leading label, as in '*.example.com'")
        if rest in ("", "."):
            raise fail("'*.' needs a domain after it, as in '*.example.com'")
        return Rule(pattern, "subdomains", _strict_name(rest, fail), None, source)

    return Rule(pattern, "name", _strict_name(pattern, fail), None, source)


def parse_network(text: str, source: str | None = None, file: str | None = None) -> Rule:
    """An address or network alone (a line of a ranges file, `file`), judged as
    `parse_pattern` judges it; PolicyError for anything else, host names too."""
    if "%" not in text:  # a zone id: parse_pattern says why it is refused
        try:
            network = ipaddress.ip_network(text)
        except ValueError:
            pass
        else:
            return _network_rule(text, network, source, file)
    rule = parse_pattern(text, source)  # raises with the policy language's own reason
    if rule.network is None:
        raise PolicyError(text, "a ranges file holds addresses and networks only", source)
    return _network_rule(text, rule.network, source, file)


def _local_rule(pattern: str, source: str | None, fail: _Fail) -> Rule:
    """``local:PORT`` (1-65535, TCP or UDP, any local address) or ``unix:PATH`` (an
    absolute path, or ``@name`` for an abstract socket)."""
    kind, _, rest = pattern.partition(":")
    if kind == "local":
        if not rest.isdigit() or not 0 < int(rest) < 65536:
            raise fail("'local:' takes a port number, 1-65535, as in 'local:3128'")
        return Rule(pattern, "local", None, None, source, endpoint=str(int(rest)))
    if not rest.startswith(("/", "@")) or rest in ("/", "@"):
        raise fail(
            "'unix:' takes a socket's absolute path, or '@name' for an abstract socket, "
            "as in 'unix:/run/docker.sock'"
        )
    return Rule(pattern, "unix", None, None, source, endpoint=rest)


def _parse_network(pattern: str, source: str | None) -> Rule:
    address_part = pattern.split("/", 1)[0]
    try:
        ipaddress.ip_address(address_part)
    except ValueError:
        reason = "'/' is not allowed in a name; write the host name alone, without a path"
        raise PolicyError(pattern, reason, source) from None
    try:
        network = ipaddress.ip_network(pattern, strict=True)
    except ValueError:
        try:
            loose = ipaddress.ip_network(pattern, strict=False)
        except ValueError:
            reason = "invalid prefix length (0-32 for IPv4, 0-128 for IPv6)"
            raise PolicyError(pattern, reason, source) from None
        raise PolicyError(pattern, f"host bits set; did you mean '{loose}'?", source) from None
    return _network_rule(pattern, network, source)


def _network_rule(
    pattern: str, network: _Network, source: str | None, file: str | None = None
) -> Rule:
    # Addresses are matched after unmapping ::ffff:a.b.c.d, so a rule written in
    # mapped form is stored as IPv4 too; otherwise it could never match anything.
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_V4_MAPPED):
        network = ipaddress.IPv4Network(
            (int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96)
        )
    return Rule(pattern, "network", None, network, source, file=file)


def _strict_name(text: str, fail: _Fail) -> str:
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise fail("empty name")
    labels: list[str] = []
    for label in text.split("."):
        if not label:
            raise fail("empty label (a leading dot or '..')")
        if label.isascii():
            ascii_label = label.lower()
        else:
            try:
                ascii_label = encodings.idna.ToASCII(label).decode("ascii")
            except UnicodeError as exc:
                length = _idna_length(label)
                if length is not None and length > _MAX_LABEL:
                    reason = f"label is longer than {_MAX_LABEL} characters once IDNA-encoded"
                else:
                    reason = f"label {label!r} cannot be IDNA-encoded ({exc})"
                raise fail(reason) from None
        if len(ascii_label) > _MAX_LABEL:
            raise fail(f"label is longer than {_MAX_LABEL} characters ({len(ascii_label)})")
        if not _LABEL_RE.fullmatch(ascii_label):
            bad = _BAD_CHAR_RE.search(ascii_label)
            char = bad.group() if bad else ascii_label
            raise fail(f"character {char!r} is not allowed in a host name")
        if ascii_label.startswith("-") or ascii_label.endswith("-"):
            raise fail(f"label {ascii_label!r} starts or ends with a hyphen")
        labels.append(ascii_label)
    name = ".".join(labels)
    if len(name) > _MAX_NAME:
        raise fail(f"name is longer than {_MAX_NAME} characters ({len(name)})")
    # "999.1.1.1" or "10.0.0" is a mistyped address, not a host name anyone can register.
    if all(label.isdigit() for label in labels):
        raise fail("not a valid IP address")
    return name


def _idna_length(label: str) -> int | None:
    # ToASCII reports "label empty or too long" for both cases; measuring the
    # encoded form lets the message say which.
    try:
        return len(b"xn--" + encodings.idna.nameprep(label).encode("punycode"))
    except UnicodeError:
        return None
