"""The CLI's text and codes without a fence: exit codes, argument errors, help, audit and
doctor lines (the event log lines: test_render).

Argument errors must be caught before any fence is built: `Fence` is replaced
by a stub that fails the test if anything tries to build one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from event_factory import ALLOWED, connection, event, result

from pytest_depfence import cli, doctor, options
from pytest_depfence.contract import audit_list
from pytest_depfence.errors import ConfigError, FenceUnavailable
from pytest_depfence.events import FenceResult
from pytest_depfence.outages import OUTAGES

# --------------------------------------------------------------------------- exit codes


@pytest.mark.parametrize(
    ("outcome", "run_code", "audit_code"),
    [
        (result(0, event(**ALLOWED)), 0, 0),
        (result(7, event(**ALLOWED)), 7, 7),
        (result(0, event()), cli.VIOLATION_EXIT, 0),
        (result(7, event()), 7, 7),
        (result(-15), 143, 143),
        (result(-15, event()), 143, 143),
        (result(-9, event(), timed_out=True), cli.TIMEOUT_EXIT, cli.TIMEOUT_EXIT),
    ],
    ids=["clean", "failed", "violations", "both", "signal", "signal-violations", "timeout"],
)
def test_exit_codes(outcome: FenceResult, run_code: int, audit_code: int) -> None:
    assert cli.exit_code(outcome) == run_code
    assert cli.command_exit(outcome) == audit_code


# --------------------------------------------------------------------------- argument errors


@pytest.fixture
def no_fence(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a fence was built for arguments that are wrong")

    monkeypatch.setattr("pytest_depfence.fence.Fence", refuse)
    monkeypatch.setattr("pytest_depfence.lab.Lab", refuse)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["run", "--no-egress", "https://github.com", "--", "true"], "'https://github.com'"),
        (["run", "--egress-only", "", "--", "true"], "--egress-only"),
        (["run", "--upstream", "10.0.0.1:99999", "--", "true"], "'10.0.0.1:99999'"),
        (["run", "--timeout", "-1", "--", "true"], "'-1' from --timeout"),
        (["run", "--json", "/no/such/dir/out.json", "--", "true"], "'/no/such/dir/out.json'"),
        (["run", "--no-egress", "a.com", "--egress-only", "b.com", "--", "true"], "not allowed"),
        (["run", "--outage", "meltdown", "--", "true"], "'meltdown'"),
        (["run", "--lab"], "no command given"),
        (["audit", "--write-contract", "my deploy.contract", "--", "true"], "--write-contract"),
        (["frobnicate"], "'frobnicate'"),
    ],
    ids=[
        "pattern",
        "empty-pattern",
        "upstream-port",
        "timeout",
        "json-dir",
        "both-policies",
        "outage",
        "no-command",
        "contract-name",
        "subcommand",
    ],
)
def test_wrong_arguments_exit_125_before_any_fence(
    argv: list[str], named: str, no_fence: None, capsys: pytest.CaptureFixture[str]
) -> None:
    code: object
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == cli.FENCE_ERROR_EXIT
    assert named in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "name", "value"),
    [
        ("--mode", "mode", "panic"),
        ("--outage", "outage", "meltdown"),
        ("--timeout", "timeout", "soon"),
        ("--upstream", "upstream", "dns.google"),
    ],
)
def test_settings_are_refused_in_the_words_of_the_plugin_and_library(
    flag: str, name: str, value: str, no_fence: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError) as expected:
        options.validate(name, value, flag)
    assert cli.main(["run", flag, value, "--", "true"]) == cli.FENCE_ERROR_EXIT
    assert capsys.readouterr().err == f"depfence: {expected.value}\n"


def test_run_help_offers_every_outage_of_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["run", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "--outage {%s}" % ",".join(OUTAGES) in text
    for outage in OUTAGES.values():
        assert outage.name in text and outage.help.split()[0] in text


def test_command_not_found_exits_127_before_any_fence(
    no_fence: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["run", "--", "no-such-command-depfence"]) == cli.NOT_FOUND_EXIT
    assert "no-such-command-depfence: command not found" in capsys.readouterr().err


# --------------------------------------------------------------------------- audit, doctor


def test_regenerate_command_repeats_every_option_that_shapes_the_result() -> None:
    contract = "tests/depfence-contracts/deploy.contract"
    argv = ["audit", "--lab", "--upstream", "10.77.0.53", "--no-egress", "github.com"]
    argv += ["--no-egress", "*.githubusercontent.com", "--timeout", "30.0", "-q"]
    argv += ["--write-contract", contract, "--", "./deploy.sh", "--config", "new cnf"]
    plan = cli.plan(cli._parser().parse_args(argv))
    assert cli.regenerate_command(plan, contract) == (
        "depfence audit --lab --upstream 10.77.0.53 --no-egress github.com "
        "--no-egress '*.githubusercontent.com' --timeout 30 "
        "--write-contract tests/depfence-contracts/deploy.contract -- ./deploy.sh --config "
        "'new cnf'"
    )


def test_audit_list_names_each_destination_with_its_programs() -> None:
    events = (
        event(),
        event(cmdline="python3 tools/update_check.py --quiet"),
        connection(cmdline="curl -s http://10.77.3.2/", address="10.77.3.2", port=80),
        connection(cmdline="curl -s http://[fd77::3:2]/", address="fd77::3:2", port=80),
    )
    text = audit_list(result(0, *events))
    assert text.splitlines() == [
        "depfence audit: 3 destinations contacted while running cmd:",
        "  10.77.3.2:80/tcp    curl",
        "  [fd77::3:2]:80/tcp  curl",
        "  github.com          curl, python3 update_check.py",
    ]
    assert audit_list(result(0)) == "depfence audit: nothing contacted while running cmd\n"


def test_failing_check_shows_the_fix_once() -> None:
    check = doctor.Check("bcc", "FAIL", "bcc is not installed (looked in X)", "apt-get install y")
    assert doctor.format_check(check).splitlines() == [
        "FAIL  bcc             bcc is not installed (looked in X)",
        " " * 22 + "fix: apt-get install y",
    ]


def test_check_shows_the_fix_the_error_carries() -> None:
    def missing() -> str:
        raise FenceUnavailable("bcc is not installed (looked in X)", fix="apt-get install y")

    check = doctor.run_check("bcc", missing)
    assert (check.status, check.detail, check.fix) == (
        "FAIL",
        "bcc is not installed (looked in X)",
        "apt-get install y",
    )


def test_the_cgroup_check_carries_its_fix(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("")

    def unmounted() -> str:
        from pytest_depfence.cgroup import cgroup2_mount

        return str(cgroup2_mount(str(mountinfo)))

    check = doctor.run_check("cgroup v2", unmounted)
    assert check.detail == "no cgroup v2 filesystem is mounted (a fence is a cgroup v2 directory)"
    assert check.fix is not None and check.fix.startswith("mount -t cgroup2 ")


def test_an_attach_the_kernel_refuses_gets_the_one_fallback() -> None:
    def refused() -> str:
        raise OSError(22, "BPF_LINK_CREATE: Invalid argument")

    check = doctor.run_check("compile and attach", refused)
    assert check.fix is not None and "bpf_link" in check.fix


def test_a_failure_nobody_can_fix_in_advance_says_to_report_it() -> None:
    def rejected() -> str:
        raise RuntimeError("the kernel's verifier rejected the connect4 program")

    check = doctor.run_check("compile+attach", rejected)
    assert check.status == "FAIL" and check.fix is not None
    assert "report it with this output" in check.fix
