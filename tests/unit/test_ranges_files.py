"""Ranges files: text and JSON (GitHub's meta) read into network rules that say where they came
from, and every way a file can be wrong said with the file, the line or key path, and where the
file was given."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from pytest_depfence import options, ranges
from pytest_depfence.addresses import AddressBook
from pytest_depfence.errors import ConfigError
from pytest_depfence.judge import Judge
from pytest_depfence.policy import Policy

WHERE = "marker at tests/test_deploy.py:7"

META = {
    "verifiable_password_authentication": False,
    "ssh_key_fingerprints": {"SHA256_RSA": "uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s"},
    "ssh_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9"],
    "hooks": ["192.30.252.0/22"],
    "web": ["192.30.252.0/22", "140.82.112.0/20"],
    "api": [
        "192.30.252.0/22",
        "185.199.108.0/22",
        "140.82.112.0/20",
        "143.55.64.0/20",
        "2606:50c0::/32",
    ],
    "actions": ["4.148.0.0/16", "20.1.2.3"],
    "domains": {"website": ["*.github.com", "*.githubusercontent.com"], "actions": ["1.2.3.4/32"]},
}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def write(name: str, text: str) -> Path:
    path = Path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_text_lines_comments_and_blank_lines() -> None:
    write("tests/ranges.txt", "# GitHub\n\n140.82.112.0/20\n  10.77.1.2   # api\n2606:50c0::/32\n")

    read = ranges.load("tests/ranges.txt", WHERE)

    assert [r.pattern for r in read.rules] == ["140.82.112.0/20", "10.77.1.2", "2606:50c0::/32"]
    assert [r.source for r in read.rules] == [
        "ranges file tests/ranges.txt:3",
        "ranges file tests/ranges.txt:4",
        "ranges file tests/ranges.txt:5",
    ]
    assert {r.kind for r in read.rules} == {"network"}
    assert {r.file for r in read.rules} == {"tests/ranges.txt"}


def test_json_every_range_at_any_depth_named_by_its_key_path() -> None:
    write("tests/github-meta.json", json.dumps(META, indent=2))

    read = ranges.load("tests/github-meta.json", WHERE)

    by_pattern = {r.pattern: r.source for r in read.rules}
    # Each network once, named where it first appears; names, keys and fingerprints ignored.
    assert list(by_pattern) == [
        "192.30.252.0/22",
        "140.82.112.0/20",
        "185.199.108.0/22",
        "143.55.64.0/20",
        "2606:50c0::/32",
        "4.148.0.0/16",
        "20.1.2.3",
        "1.2.3.4/32",
    ]
    assert by_pattern["192.30.252.0/22"] == 'ranges file tests/github-meta.json ["hooks"][0]'
    assert by_pattern["143.55.64.0/20"] == 'ranges file tests/github-meta.json ["api"][3]'
    assert by_pattern["1.2.3.4/32"] == (
        'ranges file tests/github-meta.json ["domains"]["actions"][0]'
    )


def test_a_json_top_level_list_is_read_too() -> None:
    write("r.json", '["10.0.0.0/8", "not a range"]')
    assert [r.source for r in ranges.load("r.json", WHERE).rules] == ["ranges file r.json [0]"]


@pytest.mark.parametrize(
    ("name", "text", "reason"),
    [
        (
            "r.txt",
            "10.0.0.0/8\ngithub.com\n",
            "r.txt:2: 'github.com' is not a range: a ranges file holds addresses and networks only",
        ),
        (
            "r.txt",
            "10.0.0.0/8\n\n10.0.0.1/8\n",
            "r.txt:3: '10.0.0.1/8' is not a range: host bits set; did you mean '10.0.0.0/8'?",
        ),
        ("r.txt", "https://github.com/meta\n", "r.txt:1: 'https://github.com/meta' is not a range"),
        ("r.txt", "10.0.0.0/8 github\n", "r.txt:1: '10.0.0.0/8 github' is not a range: contains"),
        ("r.txt", "# nothing\n\n", ranges.NO_RANGE),
        ("r.json", '{"api": ["10.0.0.0/8",', "not valid JSON: Expecting value at line 1"),
        ("r.json", '{"domains": ["*.github.com"]}', ranges.NO_RANGE),
        (
            "r.json",
            '{"api": ["10.0.0.0/8", "10.1.2.3/16"]}',
            "r.json [\"api\"][1]: '10.1.2.3/16' is not a range: host bits set",
        ),
    ],
    ids=[
        "name",
        "host-bits",
        "url",
        "two-words",
        "empty",
        "bad-json",
        "no-range",
        "json-host-bits",
    ],
)
def test_bad_files_say_file_line_or_key_path_and_where(name: str, text: str, reason: str) -> None:
    write(name, text)

    with pytest.raises(ConfigError) as info:
        options.validate("ranges", name, WHERE)

    assert (info.value.value, info.value.source) == (name, WHERE)
    assert info.value.reason.startswith(reason), info.value.reason


def test_a_missing_file_says_where_it_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        options.validate("ranges", ["missing.json"], "CLI flag --ranges")
    assert str(info.value) == (
        "invalid value 'missing.json' from CLI flag --ranges: "
        f"no such ranges file ({tmp_path / 'missing.json'})"
    )


@pytest.mark.parametrize("value", [5, [""], [None], {"a": 1}])
def test_ranges_are_paths(value: object) -> None:
    with pytest.raises(ConfigError, match="ranges"):
        options.validate("ranges", value, WHERE)


def test_an_edited_file_is_read_again() -> None:
    write("r.txt", "10.0.0.0/8\n")
    assert [r.pattern for r in ranges.load("r.txt", WHERE).rules] == ["10.0.0.0/8"]
    write("r.txt", "10.0.0.0/8\n172.16.0.0/12\n")
    assert len(ranges.load("r.txt", WHERE).rules) == 2


def test_ranges_are_address_rules_of_the_policy_judged_like_written_ones() -> None:
    write("tests/github-meta.json", json.dumps(META))
    read = options.validate("ranges", ["tests/github-meta.json"], WHERE)
    blocklist = Policy.no_egress("github.com", "192.30.252.0/22", source=WHERE)
    policy = blocklist.with_rules(r for f in read for r in f.rules)

    decision = policy.check_address("143.55.64.9")
    assert decision.blocked
    assert policy.explain(decision.rule) == (
        'no_egress("143.55.64.0/20") [ranges file tests/github-meta.json ["api"][3]]'
    )
    # A network the marker already lists keeps the marker as its source.
    assert policy.check_address("192.30.252.1").rule.source == WHERE  # type: ignore[union-attr]
    assert policy.check_address("::ffff:140.82.112.3").blocked  # mapped: judged as IPv4
    assert not policy.check_address("8.8.8.8").blocked
    assert policy.describe() == (
        'no_egress("github.com", "192.30.252.0/22") + ranges from tests/github-meta.json (7)'
    )
    assert pickle.loads(pickle.dumps(policy)) == policy

    allowlist = Policy.egress_only("mirror.internal").with_rules(read[0].rules)
    assert not allowlist.check_address("140.82.112.3").blocked
    assert allowlist.check_address("8.8.8.8").blocked


def test_the_first_rule_in_policy_order_decides_an_address() -> None:
    policy = Policy.no_egress("10.0.0.0/8", "10.77.0.0/16", source=WHERE)
    write("r.txt", "10.77.1.0/24\n")
    policy = policy.with_rules(ranges.load("r.txt", WHERE).rules)
    assert policy.check_address("10.77.1.2").rule.pattern == "10.0.0.0/8"  # type: ignore[union-attr]
    narrow = Policy.no_egress("10.77.1.2").with_rules(ranges.load("r.txt", WHERE).rules)
    assert narrow.check_address("10.77.1.2").rule.pattern == "10.77.1.2"  # type: ignore[union-attr]
    assert narrow.check_address("10.77.1.3").rule.pattern == "10.77.1.0/24"  # type: ignore[union-attr]


class _Sink:
    def __init__(self) -> None:
        self.networks: list[tuple[str, str]] = []

    def add_network(self, fence_id: int, network: object, verdict: str) -> None:
        self.networks.append((str(network), verdict))

    def forget_networks(self, fence_id: int, networks: object) -> None:
        self.networks.clear()


@pytest.mark.parametrize(("kind", "verdict"), [("no_egress", "block"), ("egress_only", "allow")])
def test_ranges_reach_the_kernel_through_the_address_rules(kind: str, verdict: str) -> None:
    write("r.txt", "10.77.1.0/24\nfd77::1:0/112\n")
    policy = Policy(kind, ()).with_rules(ranges.load("r.txt", WHERE).rules)  # type: ignore[arg-type]
    sink = _Sink()
    Judge(policy, "block", "nxdomain", AddressBook(1, sink)).learn_rules()
    assert sink.networks == [("10.77.1.0/24", verdict), ("fd77::1:0/112", verdict)]


def test_five_thousand_ranges_are_each_a_rule() -> None:
    """GitHub's meta is about this size; what reading it costs: bench/bench_ranges.py."""
    lines = [f"20.{i // 256}.{i % 256}.0/24" for i in range(4800)]
    lines += [f"2a01:111:f{i:03x}::/48" for i in range(200)]
    write("meta.json", json.dumps({"actions": lines, "domains": {"x": ["*.github.com"]}}))
    read = ranges.load("meta.json", WHERE)
    policy = Policy.no_egress("github.com").with_rules(read.rules)
    assert len(policy.rules) == 5001
    assert policy.check_address("20.18.191.7").blocked
    assert policy.check_address("2a01:111:f0c7::1").blocked
    assert not policy.check_address("9.9.9.9").blocked


def test_cli_ranges_are_read_by_plan_and_repeated_by_the_regenerate_command() -> None:
    from pytest_depfence import cli

    write("meta.json", json.dumps(META))
    argv = ["audit", "--no-egress", "github.com", "--ranges", "meta.json"]
    plan = cli.plan(cli._parser().parse_args([*argv, "--", "./deploy.sh"]))

    assert plan.policy.describe() == 'no_egress("github.com")'
    assert plan.fenced_policy().describe() == 'no_egress("github.com") + ranges from meta.json (8)'
    assert cli.regenerate_command(plan, "x.contract") == (
        "depfence audit --no-egress github.com --ranges meta.json --write-contract x.contract "
        "-- ./deploy.sh"
    )
    write("bad.txt", "github.com\n")
    with pytest.raises(ConfigError, match=r"from CLI flag --ranges: bad.txt:1: 'github.com'"):
        cli.plan(cli._parser().parse_args(["run", "--ranges", "bad.txt", "--", "true"]))
