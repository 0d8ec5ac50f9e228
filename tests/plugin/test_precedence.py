"""Every setting as CLI flag and ini key; the `fenced` fixture takes marker > CLI > ini.

The inner tests build real fences (the fixture opens one), so every inner
session here runs in the lab. They assert on the Fence the fixture hands out;
the outer test checks that all of them passed.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

INI = """
[pytest]
depfence_no_egress =
    github.com
    *.githubusercontent.com
depfence_upstream = 127.0.0.1:5301
depfence_mode = audit
"""

#: Marker-driven tests that behave the same whatever the CLI and ini say.
MARKED = """
import pytest

@pytest.mark.no_egress("pypi.internal")
@pytest.mark.fence(mode="block", outage="servfail", timeout=7)
def test_markers_win(fenced):
    assert fenced.policy.describe() == 'no_egress("pypi.internal")'
    assert fenced.policy.rules[0].source.startswith("marker at test_settings.py:")
    assert (fenced.mode, fenced.outage, fenced.timeout) == ("block", "servfail", 7)

@pytest.mark.egress_only("mirror.internal")
@pytest.mark.fence(mode="audit")
def test_marker_kind_wins(fenced):
    assert fenced.policy.describe() == 'egress_only("mirror.internal")'
    assert fenced.mode == "audit"
"""


@dataclass
class Scenario:
    args: tuple[str, ...]
    ini: str | None
    unmarked: str  # the body of a test without markers


SCENARIOS = {
    "ini": Scenario(
        args=(),
        ini=INI,
        unmarked="""
    assert fenced.policy.describe() == 'no_egress("github.com", "*.githubusercontent.com")'
    assert {r.source for r in fenced.policy.rules} == {"ini key depfence_no_egress"}
    assert fenced.upstream == ("127.0.0.1", 5301)  # ini beats the lab's resolver
    assert fenced.mode == "audit"
""",
    ),
    "cli-over-ini": Scenario(
        args=(
            "--depfence-no-egress",
            "mirror.internal",
            "--depfence-no-egress",
            "10.77.3.0/24",
            "--depfence-upstream",
            "127.0.0.2:5302",
            "--depfence-mode",
            "block",
        ),  # fmt: skip
        ini=INI,
        unmarked="""
    assert fenced.policy.describe() == 'no_egress("mirror.internal", "10.77.3.0/24")'
    assert {r.source for r in fenced.policy.rules} == {"CLI flag --depfence-no-egress"}
    assert fenced.upstream == ("127.0.0.2", 5302)
    assert fenced.mode == "block"
""",
    ),
    "cli-kind-over-ini-kind": Scenario(
        args=("--depfence-egress-only", "mirror.internal", "--depfence-mode", "audit"),
        ini="[pytest]\ndepfence_no_egress = github.com\ndepfence_mode = block\n",
        unmarked="""
    assert fenced.policy.describe() == 'egress_only("mirror.internal")'
    assert fenced.policy.rules[0].source == "CLI flag --depfence-egress-only"
    assert fenced.mode == "audit"
""",
    ),
    "ini-egress-only-and-lab-upstream": Scenario(
        args=(),
        ini="[pytest]\ndepfence_egress_only =\n    mirror.internal\n    pypi.internal\n",
        unmarked="""
    from pytest_depfence.options import parse_upstream
    from pytest_depfence.plugin import LAB_KEY

    assert fenced.policy.describe() == 'egress_only("mirror.internal", "pypi.internal")'
    assert fenced.policy.rules[0].source == "ini key depfence_egress_only"
    assert fenced.upstream == parse_upstream(request.config.stash[LAB_KEY].upstream)
    assert fenced.mode == "block"
""",
    ),
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_precedence(lab_run, pytester, name):
    scenario = SCENARIOS[name]
    if scenario.ini:
        pytester.makeini(scenario.ini)
    pytester.makepyfile(
        test_settings=MARKED
        + "\n\ndef test_unmarked(fenced, request):\n"
        + scenario.unmarked.strip("\n")
        + "\n"
    )

    result = lab_run(*scenario.args)

    result.assert_outcomes(passed=3)


def test_ini_twin_of_lab_flag_starts_the_lab(run, pytester, fence_buildable):
    pytester.makeini("[pytest]\ndepfence_lab = true\n")
    pytester.makepyfile(
        test_lab="""
        from pytest_depfence.options import parse_upstream
        from pytest_depfence.plugin import LAB_KEY

        def test_in_the_lab(fenced, request):
            lab = request.config.stash[LAB_KEY]
            assert fenced.upstream == parse_upstream(lab.upstream)
            # No marker, CLI or ini policy: an empty blocklist, the fence only records.
            assert fenced.policy.describe() == "no_egress()"
            assert fenced.mode == "block"
        """
    )

    # No --depfence-lab: the ini key alone must start the lab, so bcc may stay visible.
    result = run(bcc=True)

    result.assert_outcomes(passed=1)


def test_stacked_and_class_markers_add_up(lab_run, pytester):
    pytester.makepyfile(
        test_stacked="""
        import pytest

        pytestmark = pytest.mark.no_egress("dns.google")

        @pytest.mark.no_egress("github.com")
        class TestDeploy:
            @pytest.mark.no_egress("pypi.internal", "GitHub.com.")
            @pytest.mark.no_egress("mirror.internal")
            def test_all_apply(self, fenced):
                # Closest first; the class's "github.com" repeats "GitHub.com." and is dropped.
                assert fenced.policy.describe() == (
                    'no_egress("mirror.internal", "pypi.internal", "GitHub.com.", "dns.google")'
                )
                lines = [rule.source.rpartition(":")[2] for rule in fenced.policy.rules]
                assert lines == ["8", "7", "7", "3"]
        """
    )

    result = lab_run()

    result.assert_outcomes(passed=1)
