"""What a user sees when a fenced test reaches a forbidden host (in the lab, real fence)."""

from __future__ import annotations

from plugin_helpers import line_of, lit

from pytest_depfence.render import VIOLATION_HEADLINE


def test_forbidden_lookup_fails_the_test_with_the_report(lab_run, pytester):
    path = pytester.makepyfile(
        test_deploy="""
        import pytest

        @pytest.mark.no_egress("github.com")
        def test_deploy_needs_github(fenced):
            fenced.run(["getent", "hosts", "github.com"])

        @pytest.mark.no_egress("github.com")
        def test_deploy_uses_the_mirror(fenced):
            result = fenced.run(["getent", "hosts", "mirror.internal"])
            assert result.returncode == 0
            assert result.violations == []
            assert result.domains == ["mirror.internal"]
        """
    )

    result = lab_run("-rf")

    result.assert_outcomes(failed=1, passed=1)
    marker = line_of(path, "def test_deploy_needs_github") - 1  # the decorator above it
    command = "getent hosts github.com"
    headline = lit(VIOLATION_HEADLINE.format(count="@", s="@", command=command)).replace("@", "*")
    rule = lit(f'rule no_egress("github.com") [marker at test_deploy.py:{marker}]')
    result.stdout.fnmatch_lines(
        [
            "*test_deploy_needs_github*",
            f"E   *EgressViolation: {headline}",
            f"E   *blocked*github.com (*)*at dns*{rule}",
            f"E   *pid [0-9]*  {command}",
            f"test_deploy.py:{marker + 2}: EgressViolation",  # the test line, not the library's
            "FAILED test_deploy.py::test_deploy_needs_github - pytest_depfence.errors.Egre*",
        ]
    )
