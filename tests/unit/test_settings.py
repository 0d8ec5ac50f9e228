"""Parsing of settings that come from users: upstream, cgroup mount discovery."""

import pytest

from pytest_depfence.cgroup import cgroup2_mount
from pytest_depfence.errors import ConfigError, FenceUnavailable
from pytest_depfence.options import default_upstream, parse_upstream


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.77.0.53", ("10.77.0.53", 53)),
        ("10.77.0.53:5300", ("10.77.0.53", 5300)),
        ("::1", ("::1", 53)),
        ("fd77::53", ("fd77::53", 53)),
        ("[fd77::53]:5300", ("fd77::53", 5300)),
    ],
)
def test_upstream_forms(text, expected):
    assert parse_upstream(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("dns.example", "must be an IP address"),
        ("10.0.0.1:0", "not in 1..65535"),
        ("10.0.0.1:http", "not in 1..65535"),
        ("[fd77::53", "expected [IPV6]:PORT"),
    ],
)
def test_bad_upstream_names_value_and_source(text, reason):
    with pytest.raises(ConfigError) as caught:
        parse_upstream(text, "CLI flag --depfence-upstream")
    message = str(caught.value)
    assert repr(text) in message and "CLI flag --depfence-upstream" in message
    assert reason in message


def test_default_upstream_is_the_first_nameserver(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nsearch example\nnameserver 10.1.2.3\nnameserver 10.9.9.9\n")
    assert default_upstream(str(conf)) == "10.1.2.3"
    conf.write_text("search example\n")
    with pytest.raises(ConfigError, match="no nameserver"):
        default_upstream(str(conf))


HYBRID = (
    "25 30 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
    "26 25 0:23 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    "27 25 0:24 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
)
PURE = "35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n"


@pytest.mark.parametrize(
    ("text", "mount"), [(HYBRID, "/sys/fs/cgroup/unified"), (PURE, "/sys/fs/cgroup")]
)
def test_cgroup2_mount_is_found_not_assumed(tmp_path, text, mount):
    info = tmp_path / "mountinfo"
    info.write_text(text)
    assert str(cgroup2_mount(str(info))) == mount


def test_no_cgroup2_mount_is_a_clear_reason(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(HYBRID.replace("cgroup2", "cgroup"))
    with pytest.raises(FenceUnavailable, match="no cgroup v2 filesystem is mounted"):
        cgroup2_mount(str(info))
