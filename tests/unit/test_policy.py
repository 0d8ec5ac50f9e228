"""The policy language: pattern parsing, name matching, address matching, decisions."""

from __future__ import annotations

import ipaddress
import pickle

import pytest

from pytest_depfence.errors import PolicyError
from pytest_depfence.policy import (
    Decision,
    Policy,
    Rule,
    normalize_name,
    parse_pattern,
)

SOURCE = "marker at tests/test_deploy.py:12"


def rule(pattern: str) -> Rule:
    return parse_pattern(pattern, SOURCE)


# --- names: label boundaries, case, trailing dots ---------------------------


@pytest.mark.parametrize(
    "query",
    [
        "github.com",
        "api.github.com",
        "a.b.github.com",
        "deep.a.b.c.github.com",
        "GitHub.COM",
        "API.GitHub.Com",
        "github.com.",
        "api.github.com.",
        "_dmarc.github.com",
    ],
)
def test_name_pattern_matches_itself_and_every_name_below(query: str) -> None:
    assert rule("github.com").matches_name(query) is True


@pytest.mark.parametrize(
    "query",
    [
        "notgithub.com",
        "evilgithub.com",
        "github.com.evil.test",
        "github.co",
        "github.comm",
        "com",
        "github",
        "api-github.com",
        "github-com",
        "githubXcom",
    ],
)
def test_name_pattern_is_label_bounded(query: str) -> None:
    assert rule("github.com").matches_name(query) is False


@pytest.mark.parametrize("pattern", ["github.com", "GITHUB.COM", "GitHub.com.", "github.com."])
@pytest.mark.parametrize("query", ["github.com", "GITHUB.com.", "Api.Github.Com."])
def test_case_and_trailing_dot_are_ignored_on_both_sides(pattern: str, query: str) -> None:
    parsed = rule(pattern)
    assert parsed.name == "github.com"
    assert parsed.matches_name(query) is True


def test_pattern_is_kept_as_written_and_source_recorded() -> None:
    parsed = parse_pattern("GitHub.com.", "ini key depfence_no_egress")
    assert parsed.pattern == "GitHub.com."
    assert parsed.kind == "name"
    assert parsed.name == "github.com"
    assert parsed.network is None
    assert parsed.source == "ini key depfence_no_egress"


# --- wildcards ---------------------------------------------------------------


@pytest.mark.parametrize(
    "query, expected",
    [
        ("api.github.com", True),
        ("a.b.github.com", True),
        ("x.y.z.w.github.com.", True),
        ("API.GitHub.com", True),
        ("github.com", False),
        ("github.com.", False),
        ("GITHUB.COM", False),
        ("notgithub.com", False),
        ("api.notgithub.com", False),
        ("github.com.evil.test", False),
    ],
)
def test_wildcard_matches_names_below_at_any_depth_but_not_the_apex(
    query: str, expected: bool
) -> None:
    parsed = rule("*.github.com")
    assert parsed.kind == "subdomains"
    assert parsed.name == "github.com"
    assert parsed.matches_name(query) is expected


# --- IDNA --------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["bücher.example", "BÜCHER.example", "xn--bcher-kva.example"])
@pytest.mark.parametrize(
    "query",
    [
        "bücher.example",
        "Bücher.Example.",
        "xn--bcher-kva.example",
        "XN--BCHER-KVA.EXAMPLE.",
        "www.bücher.example",
        "www.xn--bcher-kva.example",
    ],
)
def test_unicode_and_punycode_spellings_match_each_other(pattern: str, query: str) -> None:
    parsed = rule(pattern)
    assert parsed.name == "xn--bcher-kva.example"
    assert parsed.matches_name(query) is True


@pytest.mark.parametrize("query", ["bucher.example", "buecher.example", "xn--bcher.example"])
def test_unicode_pattern_does_not_match_lookalike_ascii(query: str) -> None:
    assert rule("bücher.example").matches_name(query) is False


def test_unicode_wildcard_is_encoded_too() -> None:
    parsed = rule("*.münchen.de")
    assert parsed.name == "xn--mnchen-3ya.de"
    assert parsed.matches_name("www.xn--mnchen-3ya.de") is True
    assert parsed.matches_name("www.münchen.de") is True
    assert parsed.matches_name("münchen.de") is False


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("GitHub.COM.", "github.com"),
        ("github.com", "github.com"),
        ("github.com..", "github.com."),
        ("Bücher.example.", "xn--bcher-kva.example"),
        ("api.BÜCHER.Example", "api.xn--bcher-kva.example"),
        ("", ""),
        (".", ""),
    ],
)
def test_normalize_name(raw: str, expected: str) -> None:
    assert normalize_name(raw) == expected


@pytest.mark.parametrize(
    "junk",
    [
        "",
        ".",
        "..",
        "a..b",
        "\xff",
        "\udcff",
        "\x00",
        "github.com\x00",
        "*",
        " ",
        "\u200b",
        "ü" * 300,
        "a" * 1000 + ".github.com.evil",
        "xn--ü.com",
    ],
)
def test_matches_name_never_raises_on_junk(junk: str) -> None:
    assert rule("github.com").matches_name(junk) is False
    assert rule("*.github.com").matches_name(junk) is False
    assert isinstance(normalize_name(junk), str)


def test_junk_label_does_not_hide_a_blocked_parent() -> None:
    # A label the IDNA codec refuses must not stop the rest of the name from matching.
    assert rule("github.com").matches_name("\udcff.github.com") is True
    assert rule("github.com").matches_name("*.github.com") is True


def test_matches_name_accepts_a_non_str_label_object() -> None:
    class Label:
        def __str__(self) -> str:
            return "api.github.com."

    assert rule("github.com").matches_name(Label()) is True  # type: ignore[arg-type]


# --- invalid patterns --------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, reason",
    [
        ("", "empty pattern"),
        ("https://github.com", "URL"),
        ("http://github.com/org/tool", "'github.com'"),
        ("git+ssh://git@github.com", "URL"),
        ("github.com/org", "'/'"),
        ("/etc/hosts", "'/'"),
        ("github.com ", "whitespace"),
        (" github.com", "whitespace"),
        ("git hub.com", "whitespace"),
        ("github.com\t", "whitespace"),
        ("github.com\n", "whitespace"),
        ("github.com:443", "port"),
        ("140.82.112.3:443", "port"),
        ("github.com:https", "':'"),
        ("[::1]", "brackets"),
        ("[2606:50c0::1]:443", "brackets"),
        ("*", "bare '*'"),
        ("*.", "needs a domain"),
        ("*..", "needs a domain"),
        ("a.*.com", "leading label"),
        ("*github.com", "leading label"),
        ("**.x", "leading label"),
        ("*.*.github.com", "leading label"),
        ("github.*", "leading label"),
        ("git*hub.com", "leading label"),
        ("a..b", "empty label"),
        (".github.com", "empty label"),
        ("github.com..", "empty label"),
        (".", "empty name"),
        ("x" * 64 + ".com", "longer than 63"),
        ("ü" * 70 + ".com", "longer than 63"),
        (".".join(["a" * 63] * 4), "longer than 253"),
        ("a." * 126 + "bc", "longer than 253"),
        ("git!hub.com", "'!'"),
        ("github.com;", "';'"),
        ("user@github.com", "'@'"),
        ("git\\hub.com", "'\\\\'"),
        ("github.com\x00", "'\\x00'"),
        ("-github.com", "hyphen"),
        ("github-.com", "hyphen"),
        ("api.-x.com", "hyphen"),
        ("999.1.1.1", "not a valid IP address"),
        ("10.0.0", "not a valid IP address"),
        ("010.0.0.1", "not a valid IP address"),
        ("140.82.112.3/20", "host bits set"),
        ("140.82.112.3/20", "140.82.112.0/20"),
        ("2606:50c0::1/32", "host bits set"),
        ("10.0.0.0/33", "prefix length"),
        ("2606:50c0::/129", "prefix length"),
        ("fe80::1%eth0", "zone"),
    ],
)
def test_invalid_pattern_names_value_source_and_reason(pattern: str, reason: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_pattern(pattern, SOURCE)
    message = str(info.value)
    assert message.startswith(f"invalid egress pattern {pattern!r} from {SOURCE}: ")
    assert reason in message
    assert info.value.value == pattern
    assert info.value.source == SOURCE


@pytest.mark.parametrize(
    "value, type_name",
    [(None, "NoneType"), (443, "int"), (1.5, "float"), (b"github.com", "bytes")],
)
def test_non_string_pattern_names_its_repr_and_type(value: object, type_name: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_pattern(value, SOURCE)
    message = str(info.value)
    assert repr(value) in message
    assert SOURCE in message
    assert type_name in message


def test_a_list_passed_as_one_pattern_says_to_spread_it() -> None:
    with pytest.raises(PolicyError, match="its own argument"):
        parse_pattern(["github.com"], SOURCE)


def test_policy_constructor_reports_bad_pattern_with_its_source() -> None:
    with pytest.raises(PolicyError) as info:
        Policy.no_egress("github.com", "https://x.test", source="CLI flag --depfence-no-egress")
    assert info.value.value == "https://x.test"
    assert "from CLI flag --depfence-no-egress" in str(info.value)


def test_invalid_pattern_without_source_omits_from() -> None:
    with pytest.raises(PolicyError) as info:
        parse_pattern("*")
    assert str(info.value).startswith("invalid egress pattern '*': ")


@pytest.mark.parametrize("pattern", ["https://github.com", "", None, "140.82.112.3/20"])
def test_policy_error_survives_pickling(pattern: object) -> None:
    with pytest.raises(PolicyError) as info:
        parse_pattern(pattern, SOURCE)
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is PolicyError
    assert str(copy) == str(info.value)
    assert (copy.value, copy.reason, copy.source) == (
        info.value.value,
        info.value.reason,
        info.value.source,
    )


@pytest.mark.parametrize(
    "pattern",
    ["localhost", "mirror.internal", "a", "_service._tcp.example.com", "a-b.c-d.e", "x" * 63],
)
def test_valid_names_parse(pattern: str) -> None:
    assert rule(pattern).name == pattern


# --- policies ----------------------------------------------------------------


def test_no_egress_needs_a_pattern() -> None:
    with pytest.raises(PolicyError, match="no_egress needs at least one pattern") as info:
        Policy.no_egress(source=SOURCE)
    assert SOURCE in str(info.value)


@pytest.mark.parametrize(
    "query, blocked",
    [
        ("github.com", True),
        ("api.github.com.", True),
        ("objects.githubusercontent.com", True),
        ("githubusercontent.com", False),
        ("evilgithub.com", False),
        ("pypi.org", False),
        ("", False),
    ],
)
def test_no_egress_blocks_matches_and_names_the_rule(query: str, blocked: bool) -> None:
    policy = Policy.no_egress("github.com", "*.githubusercontent.com", source=SOURCE)
    decision = policy.check_name(query)
    assert decision.blocked is blocked
    if blocked:
        assert decision.rule is not None
        assert decision.rule.matches_name(query)
    else:
        assert decision.rule is None


@pytest.mark.parametrize(
    "query, blocked",
    [
        ("mirror.internal", False),
        ("pkg.mirror.internal.", False),
        ("MIRROR.INTERNAL", False),
        ("github.com", True),
        ("mirror.internal.evil.test", True),
        ("notmirror.internal", True),
        ("", True),
        ("a..b", True),
    ],
)
def test_egress_only_allows_matches_and_blocks_the_rest(query: str, blocked: bool) -> None:
    policy = Policy.egress_only("mirror.internal")
    decision = policy.check_name(query)
    assert decision.blocked is blocked
    if blocked:
        assert decision.rule is None
    else:
        assert decision.rule is not None
        assert decision.rule.pattern == "mirror.internal"


@pytest.mark.parametrize("query", ["github.com", "localhost", "mirror.internal", ""])
def test_egress_only_with_no_patterns_blocks_every_name(query: str) -> None:
    policy = Policy.egress_only()
    assert policy.rules == ()
    assert policy.check_name(query) == Decision(blocked=True, rule=None)


def test_first_matching_rule_decides() -> None:
    policy = Policy.no_egress("api.github.com", "github.com")
    decision = policy.check_name("x.api.github.com")
    assert decision.rule is not None
    assert decision.rule.pattern == "api.github.com"


def test_duplicate_patterns_keep_the_first_spelling() -> None:
    policy = Policy.no_egress("GitHub.com", "github.com.", "github.com", "*.github.com")
    assert [r.pattern for r in policy.rules] == ["GitHub.com", "*.github.com"]


def test_network_rule_never_matches_a_name_and_name_rule_never_an_address() -> None:
    assert rule("140.82.112.3").matches_name("140.82.112.3") is False
    assert rule("github.com").matches_address("140.82.112.3") is False
    assert Policy.no_egress("140.82.112.0/20").check_name("github.com").blocked is False


def test_policy_and_rules_pickle() -> None:
    policy = Policy.egress_only("mirror.internal", "10.0.0.0/8", source=SOURCE)
    assert pickle.loads(pickle.dumps(policy)) == policy


def test_policy_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="block"):
        Policy("block", ())  # type: ignore[arg-type]


# --- text --------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy, text",
    [
        (
            Policy.no_egress("github.com", "*.githubusercontent.com"),
            'no_egress("github.com", "*.githubusercontent.com")',
        ),
        (Policy.egress_only("mirror.internal"), 'egress_only("mirror.internal")'),
        (Policy.egress_only(), "egress_only()"),
        (Policy.no_egress("GitHub.com.", "10.0.0.0/8"), 'no_egress("GitHub.com.", "10.0.0.0/8")'),
        (Policy.no_egress("bücher.example"), 'no_egress("bücher.example")'),
    ],
)
def test_describe(policy: Policy, text: str) -> None:
    assert policy.describe() == text


def test_rule_text_with_and_without_source() -> None:
    with_source = Policy.no_egress("github.com", source="marker at test_deploy.py:12")
    assert (
        with_source.rule_text(with_source.rules[0])
        == 'no_egress("github.com") [marker at test_deploy.py:12]'
    )
    without = Policy.egress_only("mirror.internal")
    assert without.rule_text(without.rules[0]) == 'egress_only("mirror.internal")'


# --- addresses ---------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, address, expected",
    [
        ("140.82.112.3", "140.82.112.3", True),
        ("140.82.112.3", "140.82.112.4", False),
        ("140.82.112.0/20", "140.82.112.0", True),
        ("140.82.112.0/20", "140.82.127.255", True),
        ("140.82.112.0/20", "140.82.128.0", False),
        ("140.82.112.0/20", "::ffff:140.82.112.3", True),
        ("140.82.112.0/20", "::ffff:140.82.128.1", False),
        ("140.82.112.0/20", ipaddress.IPv4Address("140.82.113.1"), True),
        ("140.82.112.0/20", ipaddress.IPv6Address("::ffff:140.82.113.1"), True),
        ("140.82.112.0/20", "2606:50c0::1", False),
        ("2606:50c0::/32", "2606:50c0:8000::154", True),
        ("2606:50c0::/32", "2606:50c1::1", False),
        ("2606:50c0::/32", "140.82.112.3", False),
        ("2606:50C0::/32", ipaddress.IPv6Address("2606:50c0::1"), True),
        ("2606:50c0::154", "2606:50c0::154", True),
        ("0.0.0.0/0", "8.8.8.8", True),
        ("::/0", "2001:db8::1", True),
        # A rule written in mapped form means the IPv4 address it maps.
        ("::ffff:140.82.112.3", "140.82.112.3", True),
        ("::ffff:140.82.112.0/116", "::ffff:140.82.112.9", True),
        ("::ffff:140.82.112.0/116", "140.82.127.255", True),
        ("::ffff:140.82.112.0/116", "140.82.128.0", False),
    ],
)
def test_address_rules(pattern: str, address: str, expected: bool) -> None:
    parsed = rule(pattern)
    assert parsed.kind == "network"
    assert parsed.name is None
    assert parsed.matches_address(address) is expected


def test_address_rule_keeps_pattern_and_network() -> None:
    parsed = rule("2606:50c0::/32")
    assert parsed.pattern == "2606:50c0::/32"
    assert parsed.network == ipaddress.IPv6Network("2606:50c0::/32")
    assert rule("140.82.112.3").network == ipaddress.IPv4Network("140.82.112.3/32")


def test_matches_address_rejects_a_non_address_string() -> None:
    with pytest.raises(ValueError):
        rule("10.0.0.0/8").matches_address("github.com")


@pytest.mark.parametrize(
    "address, blocked",
    [
        ("140.82.112.3", True),
        ("::ffff:140.82.112.3", True),
        ("10.1.2.3", True),
        ("2606:50c0::1", True),
        ("8.8.8.8", False),
        ("192.168.1.1", False),
        ("2001:db8::1", False),
    ],
)
def test_no_egress_check_address(address: str, blocked: bool) -> None:
    policy = Policy.no_egress("github.com", "140.82.112.0/20", "10.0.0.0/8", "2606:50c0::/32")
    decision = policy.check_address(address)
    assert decision.blocked is blocked
    assert (decision.rule is not None) is blocked


@pytest.mark.parametrize(
    "address, blocked, allowed_by",
    [
        ("10.1.2.3", False, "10.0.0.0/8"),
        ("::ffff:10.1.2.3", False, "10.0.0.0/8"),
        ("fd00::1", False, "fd00::/8"),
        ("127.0.0.1", False, None),
        ("127.0.0.53", False, None),
        ("::1", False, None),
        ("::ffff:127.0.0.1", False, None),
        ("140.82.112.3", True, None),
        ("192.168.1.1", True, None),
        ("172.16.0.1", True, None),
        ("2606:50c0::1", True, None),
    ],
)
def test_egress_only_check_address(address: str, blocked: bool, allowed_by: str | None) -> None:
    policy = Policy.egress_only("mirror.internal", "10.0.0.0/8", "fd00::/8")
    decision = policy.check_address(address)
    assert decision.blocked is blocked
    assert (decision.rule.pattern if decision.rule else None) == allowed_by


def test_egress_only_without_patterns_still_allows_loopback() -> None:
    policy = Policy.egress_only()
    assert policy.check_address("127.0.0.1").blocked is False
    assert policy.check_address("::1").blocked is False
    assert policy.check_address("10.0.0.1").blocked is True


def test_loopback_stays_reachable_under_no_egress() -> None:
    policy = Policy.no_egress("127.0.0.0/8", "::1")
    assert policy.check_address("127.0.0.1") == Decision(blocked=False, rule=None)
    assert policy.check_address("::1") == Decision(blocked=False, rule=None)
