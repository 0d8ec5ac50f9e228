"""Ranges files as policy input: `fence(ranges=...)`, `--depfence-ranges`, ini `depfence_ranges`.

A marker's paths are relative to the test file, the flag's to where pytest was
started, the ini key's to the ini file. Each range is an address rule: under
no_egress the lab's api.github.com address (10.77.1.2), never resolved by the
script, is refused and the failure names the file and where in it the range is.
A missing file or a bad line stops the run before any test, naming both.
"""

from __future__ import annotations

import json

import pytest
from plugin_helpers import line_of

API_META = {
    "ssh_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9"],
    "web": ["192.30.252.0/22"],
    "api": ["192.30.252.0/22", "10.77.1.2/32"],
    "domains": {"website": ["*.github.com"]},
}

#: Runs curl against api.github.com's lab address, never resolving a name.
CURL_API = """
import pytest

{marks}
def test_api_by_address(fenced):
    fenced.run(["curl", "-sS", "--max-time", "10", "http://10.77.1.2/"])
"""


def test_marker_ranges_relative_to_the_test_file_block_an_unresolved_address(
    lab_run, pytester: pytest.Pytester
) -> None:
    sub = pytester.mkdir("deploy")
    (sub / "github-meta.json").write_text(json.dumps(API_META, indent=2))
    (sub / "test_deploy.py").write_text(
        CURL_API.format(
            marks='@pytest.mark.no_egress("github.com")\n'
            '@pytest.mark.fence(ranges="github-meta.json")'
        )
        + """
@pytest.mark.no_egress("github.com")
def test_without_ranges_it_gets_through(fenced):
    fenced.run(["curl", "-sS", "--max-time", "10", "http://10.77.1.2/"])
"""
    )

    result = lab_run("deploy", "-p", "no:randomly")

    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*EgressViolation*",
            '*10.77.1.2:80/tcp*no_egress("10.77.1.2/32") '
            '[[]ranges file deploy/github-meta.json [[]"api"][[]1]]*',
        ]
    )


def test_ini_ranges_relative_to_the_ini_file_and_the_flag_beats_them(
    lab_run, pytester: pytest.Pytester
) -> None:
    pytester.makeini("[pytest]\ndepfence_ranges = ranges/github.txt\n")
    (pytester.mkdir("ranges") / "github.txt").write_text("# api.github.com\n10.77.1.0/24\n")
    (pytester.path / "flag.txt").write_text("10.77.3.1\n")  # mirror.internal
    pytester.makepyfile(test_ini=CURL_API.format(marks='@pytest.mark.no_egress("github.com")'))

    from_ini = lab_run()
    from_flag = lab_run("--depfence-ranges=flag.txt")

    from_ini.assert_outcomes(failed=1)
    from_ini.stdout.fnmatch_lines(
        ['*no_egress("10.77.1.0/24") [[]ranges file ranges/github.txt:2]*']
    )
    from_flag.assert_outcomes(passed=1)  # the flag's file replaces the ini key's


def test_bad_ranges_stop_the_run_naming_file_line_and_where(run, pytester: pytest.Pytester) -> None:
    (pytester.path / "bad.txt").write_text("10.77.1.0/24\ngithub.com\n")
    path = pytester.makepyfile(
        test_bad="""
import pytest

@pytest.mark.fence(ranges=["missing.json"])
def test_missing(fenced):
    pass

@pytest.mark.fence(ranges="bad.txt")
def test_bad_line(fenced):
    pass
"""
    )

    result = run()

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    missing = line_of(path, "missing.json")
    bad = line_of(path, '"bad.txt"')
    result.stderr.fnmatch_lines_random(
        [
            f"*test_missing: invalid value 'missing.json' from marker at test_bad.py:{missing}: "
            "no such ranges file*",
            f"*test_bad_line: invalid value 'bad.txt' from marker at test_bad.py:{bad}: "
            "bad.txt:2: 'github.com' is not a range: a ranges file holds addresses and "
            "networks only",
        ]
    )


def test_a_bad_ini_ranges_file_is_a_usage_error(run, pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ndepfence_ranges = meta.json\n")
    (pytester.path / "meta.json").write_text('{"api": ["10.77.1.0/24",')
    pytester.makepyfile(test_x="def test_x():\n    pass\n")

    result = run()

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*invalid value 'meta.json' from ini key depfence_ranges: not valid JSON: *line 1*"]
    )
