"""The test lab, checked with the real clients the fence tests use (dig, curl, git).

Every client runs inside the lab namespace: it is forked from the thread that
entered the lab. Nothing here can reach the machine's network: the lab has no
route off itself, which test_nothing_leaves_the_lab checks.
"""

from __future__ import annotations

import errno
import glob
import io
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

if os.geteuid() != 0:
    pytest.skip("the lab needs root (it creates a network namespace)", allow_module_level=True)
_missing = [tool for tool in ("dig", "curl", "git", "ip") if shutil.which(tool) is None]
if _missing:
    pytest.skip(
        f"the lab tests need {', '.join(_missing)} (apt-get install dnsutils curl git iproute2)",
        allow_module_level=True,
    )

from pytest_depfence import lab as lab_module  # noqa: E402
from pytest_depfence.lab import Lab, LabError  # noqa: E402

R4, R6 = Lab.RESOLVER4, Lab.RESOLVER6
HOSTS = sorted(Lab().hosts)


# A proxy from the environment would be unreachable in the lab: clients talk to it directly.
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


def run(*cmd: str) -> str:
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, env=CLEAN_ENV
    )
    assert done.returncode == 0, f"{cmd} exited {done.returncode}: {done.stderr}"
    return done.stdout


def dig(*args: str) -> str:
    # One fast try: the lab answers at once or not at all.
    return run("dig", "+time=2", "+tries=1", *args)


def netns_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def lab_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("depfence-lab")}


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def lab_tempdirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "depfence-lab-*")))


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab() as the_lab:
        yield the_lab


# --------------------------------------------------------------------------- DNS


@pytest.mark.parametrize("name", HOSTS)
def test_dig_answers_a_and_aaaa_for_every_lab_name(lab: Lab, name: str) -> None:
    assert dig("+short", f"@{R4}", name, "A").split() == [lab.address(name, 4)]
    assert dig("+short", f"@{R4}", name, "AAAA").split() == [lab.address(name, 6)]


def test_dig_over_tcp_and_ipv6(lab: Lab) -> None:
    github4, github6 = lab.address("github.com"), lab.address("github.com", 6)
    assert dig("+short", "+tcp", f"@{R4}", "github.com", "A").split() == [github4]
    assert dig("+short", f"@{R6}", "github.com", "AAAA").split() == [github6]
    assert dig("+short", "+tcp", f"@{R6}", "github.com", "A").split() == [github4]


@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
@pytest.mark.parametrize("resolver", [R4, R6])
def test_resolver_answers_on_the_alt_port(lab: Lab, transport: str, resolver: str) -> None:
    out = dig("+short", transport, f"@{resolver}", "-p", str(Lab.ALT_PORT), "api.github.com")
    assert out.split() == [lab.address("api.github.com")]


def test_answers_are_case_insensitive_and_echo_the_case(lab: Lab) -> None:
    out = dig("+noall", "+answer", f"@{R4}", "GitHub.COM", "A")
    owner, ttl, _, rtype, address = out.split()
    assert (owner, ttl, rtype, address) == ("GitHub.COM.", "60", "A", lab.address("github.com"))


def test_cname_chain_ends_at_a_github_name(lab: Lab) -> None:
    out = dig("+short", f"@{R4}", "downloads.mirror.internal", "A")
    assert out.split() == [
        "objects.githubusercontent.com.",
        lab.address("objects.githubusercontent.com"),
    ]
    out = dig("+short", "+tcp", f"@{R4}", "downloads.mirror.internal", "AAAA")
    assert out.split() == [
        "objects.githubusercontent.com.",
        lab.address("objects.githubusercontent.com", 6),
    ]
    out = dig("+short", f"@{R4}", "downloads.mirror.internal", "CNAME")
    assert out.split() == ["objects.githubusercontent.com."]


@pytest.mark.parametrize(
    ("name", "zone"), [("nope.example.test", "."), ("nothere.github.com", "github.com.")]
)
def test_unknown_name_is_nxdomain_with_soa(lab: Lab, name: str, zone: str) -> None:
    out = dig("+noall", "+comments", "+authority", f"@{R4}", name, "A")
    assert "status: NXDOMAIN" in out
    authority = [line.split() for line in out.splitlines() if line and not line.startswith(";")]
    assert len(authority) == 1
    assert authority[0][0] == zone
    assert authority[0][3] == "SOA"
    assert authority[0][-1] == "60"  # negative TTL


def test_known_name_without_that_type_is_nodata(lab: Lab) -> None:
    out = dig("+noall", "+comments", "+authority", "+answer", f"@{R4}", "github.com", "MX")
    assert "status: NOERROR" in out
    assert "ANSWER: 0" in out
    assert " SOA " in out.replace("\t", " ")


def test_garbage_gets_no_answer_and_harms_nothing(lab: Lab) -> None:
    for family, resolver in ((socket.AF_INET, R4), (socket.AF_INET6, R6)):
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"\x00\x01garbage", (resolver, 53))
        with socket.create_connection((resolver, 53), timeout=10) as conn:
            conn.sendall(b"\x00\x05junk!")
            assert conn.recv(100) == b""  # the server hangs up
    assert dig("+short", f"@{R4}", "github.com").split() == [lab.address("github.com")]


def test_several_queries_on_one_tcp_connection(lab: Lab) -> None:
    out = dig("+tcp", "+keepopen", "+short", f"@{R4}", "github.com", "mirror.internal")
    assert out.split() == [lab.address("github.com"), lab.address("mirror.internal")]


# --------------------------------------------------------------------------- HTTP


@pytest.mark.parametrize("name", HOSTS)
def test_every_host_serves_its_name_on_both_families(lab: Lab, name: str) -> None:
    assert run("curl", "-sf", f"http://{lab.address(name)}/") == f"lab:{name}\n"
    assert run("curl", "-sfg", f"http://[{lab.address(name, 6)}]/") == f"lab:{name}\n"


def test_http_log_records_address_host_and_path(lab: Lab) -> None:
    lab.clear_http_log()
    github = lab.address("github.com")
    run("curl", "-sf", "-H", "Host: github.com", f"http://{github}/")
    run("curl", "-s", f"http://{github}/missing?x=1")
    assert lab.http_log() == [(github, "github.com", "/"), (github, github, "/missing?x=1")]


def test_the_test_thread_itself_is_in_the_lab(lab: Lab) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{lab.address('mirror.internal')}/", timeout=10) as r:
        assert r.read() == b"lab:mirror.internal\n"


def test_release_assets(lab: Lab) -> None:
    release = run(
        "curl", "-sf", f"http://{lab.address('api.github.com')}/repos/org/tool/releases/latest"
    )
    assert json.loads(release) == {"tag_name": "v1.2.3"}
    github = f"http://{lab.address('github.com')}/org/tool/releases/latest/download/tool.tgz"
    mirror = f"http://{lab.address('mirror.internal')}/tool.tgz"
    archives = [
        subprocess.run(
            ["curl", "-sf", url], capture_output=True, check=True, timeout=60, env=CLEAN_ENV
        ).stdout
        for url in (github, mirror)
    ]
    assert archives[0] == archives[1]
    with tarfile.open(fileobj=io.BytesIO(archives[0]), mode="r:gz") as tar:
        assert tar.getnames() == ["tool/bin/tool"]


def test_unknown_paths_and_escapes_are_404(lab: Lab) -> None:
    github = lab.address("github.com")
    for path in ("/nothing", "/org/tool.git/../../../../etc/passwd", "/org/tool.git/"):
        code = run(
            "curl",
            "-s",
            "--path-as-is",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            f"http://{github}{path}",
        )
        assert code == "404", path


def test_git_over_dumb_http(lab: Lab, tmp_path: Path) -> None:
    url = f"http://{lab.address('github.com')}/org/tool.git"
    refs = {line.split("\t")[1] for line in run("git", "ls-remote", url).splitlines()}
    assert {"refs/heads/main", "refs/tags/v1.2.3"} <= refs
    target = str(tmp_path / "tool")
    run("git", "clone", "-q", url, target)
    with open(os.path.join(target, "README")) as readme:
        assert "depfence lab" in readme.read()


# --------------------------------------------------------------------------- isolation


def test_nothing_leaves_the_lab(lab: Lab) -> None:
    lab_nets = [
        ipaddress.ip_network(n) for n in ("10.77.0.0/16", "fd77::/64", "127.0.0.0/8", "::1/128")
    ]
    for family in ("-4", "-6"):
        routes = json.loads(run("ip", "-j", family, "route", "show", "table", "all"))
        assert routes, family
        for route in routes:
            assert route["dst"] != "default", route
            dst = ipaddress.ip_network(route["dst"], strict=False)
            assert any(
                net.version == dst.version and dst.subnet_of(net)  # type: ignore[arg-type]
                for net in lab_nets
            ), route
    # No route means the kernel refuses before a packet exists: safe to try.
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            with pytest.raises(OSError) as err:
                sock.connect(("10.255.255.53", 53))
            assert err.value.errno == errno.ENETUNREACH


# --------------------------------------------------------------------------- lifecycle


def test_exit_restores_the_thread_and_leaves_nothing() -> None:
    outside, threads, fds, tmpdirs = netns_inode(), lab_threads(), open_fds(), lab_tempdirs()
    with Lab() as lab:
        inside = netns_inode()
        assert inside != outside
        # Ready as soon as __enter__ returns: no wait before the first request.
        assert run("curl", "-sf", f"http://{lab.address('github.com')}/") == "lab:github.com\n"
        assert lab_threads() - threads
    assert netns_inode() == outside
    assert glob.glob("/run/netns/depfence-lab-*") == []
    assert lab_threads() == threads
    assert open_fds() == fds
    assert lab_tempdirs() == tmpdirs
    holders = []
    for path in glob.glob("/proc/[0-9]*/task/[0-9]*/ns/net"):
        try:
            if os.stat(path).st_ino == inside:
                holders.append(path)
        except OSError:
            pass  # the task ended meanwhile
    assert holders == []


def test_a_lab_can_be_entered_again_after_exit() -> None:
    lab = Lab()
    for _ in range(2):
        with lab:
            assert dig("+short", f"@{R4}", "pypi.internal").split() == [
                lab.address("pypi.internal")
            ]


def test_entering_twice_is_an_error() -> None:
    outside = netns_inode()
    with Lab() as lab:
        inside = netns_inode()
        with pytest.raises(LabError, match="already entered"):
            lab.__enter__()
        assert netns_inode() == inside
    assert netns_inode() == outside


def test_exit_without_enter_is_an_error() -> None:
    with pytest.raises(LabError, match="not entered"):
        Lab().__exit__(None, None, None)


def test_exit_from_another_thread_is_an_error() -> None:
    with Lab() as lab:
        errors: list[BaseException] = []

        def exit_elsewhere() -> None:
            try:
                lab.__exit__(None, None, None)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=exit_elsewhere)
        thread.start()
        thread.join()
        assert len(errors) == 1
        assert isinstance(errors[0], LabError)


@pytest.mark.parametrize("step", ["_make_git_repo", "_Dispatcher.start"])
def test_a_failed_enter_undoes_everything(monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise LabError("injected failure")

    if step == "_Dispatcher.start":
        monkeypatch.setattr(lab_module._Dispatcher, "start", fail)
    else:
        monkeypatch.setattr(lab_module, step, fail)
    outside, threads, fds, tmpdirs = netns_inode(), lab_threads(), open_fds(), lab_tempdirs()
    lab = Lab()
    with pytest.raises(LabError, match="injected failure"):
        lab.__enter__()
    assert netns_inode() == outside
    assert lab_threads() == threads
    assert open_fds() == fds
    assert lab_tempdirs() == tmpdirs
    monkeypatch.undo()
    with lab:  # nothing half-built is left in the way
        assert netns_inode() != outside


def test_addresses_and_upstream() -> None:
    lab = Lab()
    assert lab.upstream == "10.77.0.53:53"
    assert lab.address("GitHub.com.") == lab.hosts["github.com"].ipv4 == "10.77.1.1"
    assert lab.address("dns.google", 6) == "fd77::8:8"
    assert lab.address("dns.google", socket.AF_INET) == "10.77.8.8"
    with pytest.raises(KeyError, match="not a lab host"):
        lab.address("example.com")
    with pytest.raises(ValueError, match="family"):
        lab.address("github.com", 5)
    addresses = [h.ipv4 for h in lab.hosts.values()] + [h.ipv6 for h in lab.hosts.values()]
    assert len(set(addresses)) == len(addresses)
    assert R4 not in addresses and R6 not in addresses
