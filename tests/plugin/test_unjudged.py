"""A fenced test with no policy anywhere judges nothing: the summary says what it contacted."""

from __future__ import annotations

from plugin_helpers import lit

from pytest_depfence.plugin.results import UNJUDGED

SESSION = """
import pytest

def test_no_policy(fenced):
    fenced.run(["getent", "hosts", "mirror.internal"])
    fenced.run(["getent", "hosts", "api.github.com"])

@pytest.mark.no_egress("github.com")
def test_with_policy(fenced):
    fenced.run(["getent", "hosts", "mirror.internal"])
"""


def test_a_fenced_test_without_a_policy_is_listed_with_what_it_contacted(lab_run, pytester):
    pytester.makepyfile(test_deploy=SESSION)

    result = lab_run()

    result.assert_outcomes(passed=2)
    line = UNJUDGED.format(
        test_id="test_deploy.py::test_no_policy", domains="api.github.com, mirror.internal"
    )
    result.stdout.fnmatch_lines(["*depfence: fenced tests without a policy*", lit(line)])
    result.stdout.no_fnmatch_line("*test_with_policy: no policy*")


def test_a_policy_from_the_command_line_counts(lab_run, pytester):
    pytester.makepyfile(test_deploy=SESSION)

    result = lab_run("--depfence-no-egress=pypi.internal")

    result.assert_outcomes(passed=2)
    result.stdout.no_fnmatch_line("*fenced tests without a policy*")
