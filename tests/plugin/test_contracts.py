"""Contracts: `fence(contract=NAME)` pins a test's egress to a reviewed file (in the lab).

The inner project is a deploy script (`deploy.sh`, edited between runs the way
a pull request would) and a test in `tests/` whose contract lives beside it,
in `tests/depfence-contracts/deploy.contract`. The policy blocks only
objects.githubusercontent.com, so api.github.com is allowed by the policy and
only the contract can catch it.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from plugin_helpers import line_of, lit
from report_helpers import (
    by_test_id,
    read_report,
    write_script,
)

from pytest_depfence.contract import (
    CONTRACTS_DIR,
    SUFFIX,
    Comparison,
    check_name,
    missing_text,
    new_destinations_text,
)
from pytest_depfence.errors import ConfigError
from pytest_depfence.events import EgressEvent

NODE_ID = "tests/test_deploy.py::test_deploy"
#: As the plugin shows it: relative to the rootdir, beside the test file.
SHOWN = Path("tests", CONTRACTS_DIR, f"deploy{SUFFIX}")
REGENERATE = f"pytest --depfence-update-contracts {NODE_ID}"
MIRROR = "curl -s http://mirror.internal/"
API = "getent hosts api.github.com"
SECTION = "*= depfence contracts =*"

DEPLOY_TEST = """
import pytest

@pytest.mark.no_egress("objects.githubusercontent.com")
@pytest.mark.fence(contract="deploy")
def test_deploy(fenced):
    result = fenced.run(["./deploy.sh"])
    assert result.returncode == 0, result.stderr
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> Path:
    """The inner project; returns where the contract must be."""
    pytester.makeini("[pytest]\n")
    tests = pytester.mkdir("tests")
    (tests / "test_deploy.py").write_text(textwrap.dedent(DEPLOY_TEST))
    write_script(pytester.path / "deploy.sh", MIRROR)
    return pytester.path / SHOWN


def contract_text(*lines: str) -> str:
    """A contract as the README documents it: header, then sorted, aligned lines."""
    header = ['# depfence contract "deploy"', f"# Regenerate: {REGENERATE}"]
    return "\n".join([*header, *lines]) + "\n"


def error_lines(text: str) -> list[str]:
    """A multi-line ContractError message as the failure shows it: the message alone."""
    first, *rest = text.splitlines()
    return [f"ContractError: {lit(first)}"] + [lit(line) for line in rest]


def test_missing_contract_fails_with_the_command_that_creates_it(lab_run, pytester, project):
    result = lab_run()

    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(error_lines(missing_text(SHOWN, REGENERATE)))
    result.stdout.no_fnmatch_line("*def _contract(*")  # no plugin source before the message
    # What the script printed comes with the failure.
    result.stdout.fnmatch_lines(["*Captured fenced stdout call*", "$ ./deploy.sh"])
    assert not project.exists()


def test_update_creates_the_contract_and_the_next_run_passes(lab_run, pytester, project):
    result = lab_run("--depfence-update-contracts")

    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([SECTION, lit(f"contract {SHOWN} created")])
    assert project.read_text() == contract_text("mirror.internal  curl")

    result = lab_run()

    result.assert_outcomes(passed=1)
    result.stdout.no_fnmatch_line(SECTION)


def test_new_destination_fails_naming_it_its_command_and_the_contract(lab_run, pytester, project):
    project.parent.mkdir()
    project.write_text(contract_text("mirror.internal  curl"))
    lab_run().assert_outcomes(passed=1)  # the contract matches what the script does today
    write_script(pytester.path / "deploy.sh", MIRROR, API)  # the pull request

    result = lab_run()

    result.assert_outcomes(failed=1)
    asked = EgressEvent("api.github.com", None, 53, "udp", "allowed", None, None, 1, API)
    expected = new_destinations_text(
        Comparison({"api.github.com": (asked,)}, ()), SHOWN, REGENERATE
    )
    result.stdout.fnmatch_lines(error_lines(expected))
    result.stdout.no_fnmatch_line("*EgressViolation*")  # the policy allows it

    result = lab_run("--depfence-update-contracts")

    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([SECTION, lit(f"contract {SHOWN} updated")])
    assert project.read_text() == contract_text(
        "api.github.com   getent",
        "mirror.internal  curl",
    )


def test_destination_no_longer_contacted_is_a_note_not_a_failure(lab_run, pytester, project):
    project.parent.mkdir()
    project.write_text(contract_text("api.github.com   getent", "mirror.internal  curl"))
    # The script used to run `getent hosts api.github.com` too; the pull request drops it.
    report = pytester.path / "report.json"

    result = lab_run("--depfence-report", str(report))

    result.assert_outcomes(passed=1)
    note = f"contract {SHOWN}: api.github.com is listed but was not contacted"
    result.stdout.fnmatch_lines([SECTION, lit(note)])
    test = by_test_id(read_report(report))[NODE_ID]
    assert (test["outcome"], test["notes"]) == ("passed", [note])


def test_update_writes_the_same_bytes_and_is_quiet_when_nothing_changed(lab_run, pytester, project):
    # Contacted out of order, by several programs: the file is sorted anyway.
    write_script(
        pytester.path / "deploy.sh",
        "getent hosts pypi.internal",
        MIRROR,
        "getent hosts mirror.internal",
    )
    lab_run("--depfence-update-contracts").assert_outcomes(passed=1)
    first = project.read_bytes()
    project.unlink()

    result = lab_run("--depfence-update-contracts")

    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([SECTION, lit(f"contract {SHOWN} created")])
    assert project.read_bytes() == first
    assert first.decode() == contract_text(
        "mirror.internal  curl, getent",
        "pypi.internal    getent",
    )
    written = project.stat().st_mtime_ns

    result = lab_run("--depfence-update-contracts")

    result.assert_outcomes(passed=1)
    result.stdout.no_fnmatch_line(SECTION)  # nothing changed, so nothing to say
    assert project.read_bytes() == first
    assert project.stat().st_mtime_ns == written  # not even rewritten


def test_bad_contract_name_is_a_usage_error_naming_the_marker_line(run, pytester):
    path = pytester.makepyfile(
        test_bad="""
        import pathlib
        import pytest

        @pytest.mark.no_egress("github.com")
        @pytest.mark.fence(contract="../x")
        def test_deploy(fenced):
            pathlib.Path("a-test-ran").write_text("yes")
        """
    )

    result = run()

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    source = f"marker at test_bad.py:{line_of(path, 'contract=')}"
    with pytest.raises(ConfigError) as error:
        check_name("../x", source)
    result.stderr.fnmatch_lines(
        [
            "ERROR: depfence: invalid fence configuration",
            f"test_bad.py::test_deploy: {lit(str(error.value))}",
        ]
    )
    assert not (pytester.path / "a-test-ran").exists()
    assert not list(pytester.path.rglob(f"*{SUFFIX}"))
