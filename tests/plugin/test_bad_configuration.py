"""A bad pattern or setting stops the run before any test runs, and says where it was written."""

from __future__ import annotations

import pytest
from plugin_helpers import line_of, lit

from pytest_depfence.errors import ConfigError, PolicyError
from pytest_depfence.plugin.markers import UNFENCED

#: Every test module here also has this test; it must never run.
SIDE_EFFECT = """
import pathlib

def test_side_effect():
    pathlib.Path("a-test-ran").write_text("yes")
"""


def message(error: ConfigError | PolicyError) -> str:
    """The error's text as an fnmatch pattern, with the reason (`...`) left open."""
    return lit(str(error)).replace("...", "*")


def assert_stopped_before_tests(result: pytest.RunResult, pytester: pytest.Pytester) -> None:
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert not (pytester.path / "a-test-ran").exists()
    assert " passed" not in result.stdout.str()


def test_bad_marker_patterns_name_value_and_line(run, pytester):
    path = pytester.makepyfile(
        test_x=SIDE_EFFECT
        + """
import pytest

@pytest.mark.no_egress("https://github.com/x")
def test_url():
    pass

@pytest.mark.no_egress("*")
def test_star():
    pass

@pytest.mark.egress_only("")
def test_empty():
    pass

@pytest.mark.no_egress(5)
def test_not_a_string():
    pass
"""
    )

    result = run()

    assert_stopped_before_tests(result, pytester)
    cases = [
        ("test_url", "https://github.com/x", '"https://github.com/x"'),
        ("test_star", "*", '"*"'),
        ("test_empty", "", '""'),
        ("test_not_a_string", repr(5), "(5)"),
    ]
    # Every bad marker in one go, each with its own line.
    expected = ["ERROR: depfence: invalid fence configuration"]
    for test, value, written in cases:
        source = f"marker at test_x.py:{line_of(path, written)}"
        expected.append(f"test_x.py::{test}: {message(PolicyError(value, '...', source))}")
    result.stderr.fnmatch_lines(expected)


def test_class_and_module_markers_name_their_own_line(run, pytester):
    path = pytester.makepyfile(
        test_levels=SIDE_EFFECT
        + """
import pytest

pytestmark = pytest.mark.no_egress("github.com/org")

@pytest.mark.no_egress("mirror.internal:80")
class TestClass:
    def test_method(self):
        pass
"""
    )

    result = run()

    assert_stopped_before_tests(result, pytester)
    module_line = line_of(path, "pytestmark")
    class_line = line_of(path, "mirror.internal:80")
    result.stderr.fnmatch_lines(
        [
            "*test_levels.py::test_side_effect: "
            + message(
                PolicyError("github.com/org", "...", f"marker at test_levels.py:{module_line}")
            ),
            "*test_levels.py::TestClass::test_method: *"
            + lit(f"marker at test_levels.py:{class_line}:")
            + "*",
        ]
    )


def test_stacked_markers_name_the_bad_one(run, pytester):
    path = pytester.makepyfile(
        test_stacked=SIDE_EFFECT
        + """
import pytest

@pytest.mark.no_egress("github.com")
@pytest.mark.no_egress("bad pattern")
@pytest.mark.no_egress("pypi.internal")
def test_stacked():
    pass
"""
    )

    result = run()

    assert_stopped_before_tests(result, pytester)
    source = f"marker at test_stacked.py:{line_of(path, 'bad pattern')}"
    result.stderr.fnmatch_lines([f"*{message(PolicyError('bad pattern', '...', source))}"])


def test_fence_marker_rejects_an_unknown_setting_listing_the_known(run, pytester):
    path = pytester.makepyfile(
        test_fence=SIDE_EFFECT
        + """
import pytest

@pytest.mark.fence(memroy="1G")
def test_memory():
    pass
"""
    )

    result = run()

    assert_stopped_before_tests(result, pytester)
    source = f"marker at test_fence.py:{line_of(path, 'memroy=')}"
    error = message(ConfigError("memroy='1G'", "...", source))
    result.stderr.fnmatch_lines(
        [f"test_fence.py::test_memory: {error}mode, outage, timeout, contract, memory, cpus, pids*"]
    )


@pytest.mark.parametrize(
    ("kwargs", "value"),
    [
        ("mode='strict'", "strict"),
        ("outage='drop'", "drop"),
        ("timeout=0", "0"),
        ("timeout='5'", "'5'"),
        ("raw_sockets='yes'", "'yes'"),
        ("memory='lots'", "lots"),
        ("memory=4096", "4096"),
        ("cpus=0", "0"),
        ("pids=2.5", "2.5"),
    ],
)
def test_fence_marker_values_are_checked(run, pytester, kwargs, value):
    path = pytester.makepyfile(
        test_fence=SIDE_EFFECT
        + f"""
import pytest

@pytest.mark.fence({kwargs})
def test_fence():
    pass
"""
    )

    result = run()

    assert_stopped_before_tests(result, pytester)
    source = f"marker at test_fence.py:{line_of(path, 'mark.fence(')}"
    result.stderr.fnmatch_lines([f"*{message(ConfigError(value, '...', source))}"])


def test_both_policy_kinds_on_one_test_are_rejected(run, pytester):
    path = pytester.makepyfile(
        test_both=SIDE_EFFECT
        + """
import pytest

@pytest.mark.no_egress("github.com")
@pytest.mark.egress_only("mirror.internal")
def test_both():
    pass
"""
    )

    result = run()

    assert_stopped_before_tests(result, pytester)
    sources = (
        f"no_egress marker at test_both.py:{line_of(path, 'no_egress(')}, "
        f"egress_only marker at test_both.py:{line_of(path, 'egress_only(')}"
    )
    error = ConfigError("no_egress + egress_only", "...", sources)
    result.stderr.fnmatch_lines([f"test_both.py::test_both: {message(error)}choose one*"])


# --- CLI flags and ini keys -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "ini", "error"),
    [
        (
            ("--depfence-no-egress", "github.com", "--depfence-no-egress", "https://github.com/x"),
            None,
            PolicyError("https://github.com/x", "...", "CLI flag --depfence-no-egress"),
        ),
        (
            ("--depfence-egress-only", "*"),
            None,
            PolicyError("*", "...", "CLI flag --depfence-egress-only"),
        ),
        (
            (),
            "depfence_no_egress =\n    github.com\n    github.com/org",
            PolicyError("github.com/org", "...", "ini key depfence_no_egress"),
        ),
        (
            ("--depfence-upstream", "dns.example"),
            None,
            ConfigError("dns.example", "...", "CLI flag --depfence-upstream"),
        ),
        (
            ("--depfence-upstream", "127.0.0.1:99999"),
            None,
            ConfigError("127.0.0.1:99999", "...", "CLI flag --depfence-upstream"),
        ),
        (
            (),
            "depfence_upstream = 127.0.0.1:dns",
            ConfigError("127.0.0.1:dns", "...", "ini key depfence_upstream"),
        ),
        (
            ("--depfence-mode", "strict"),
            None,
            ConfigError("strict", "...", "CLI flag --depfence-mode"),
        ),
        ((), "depfence_mode = Block", ConfigError("Block", "...", "ini key depfence_mode")),
    ],
    ids=[
        "cli-no-egress",
        "cli-egress-only",
        "ini-no-egress",
        "cli-upstream-hostname",
        "cli-upstream-port",
        "ini-upstream-port",
        "cli-mode",
        "ini-mode",
    ],
)
def test_bad_setting_names_its_source(run, pytester, args, ini, error):
    pytester.makepyfile(test_x=SIDE_EFFECT)
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")

    result = run(*args)

    assert_stopped_before_tests(result, pytester)
    result.stderr.fnmatch_lines([f"ERROR: depfence: {message(error)}"])


def test_bad_ini_bool_is_a_usage_error(run, pytester):
    pytester.makepyfile(test_x=SIDE_EFFECT)
    pytester.makeini("[pytest]\ndepfence_require = maybe\n")

    result = run()

    assert_stopped_before_tests(result, pytester)
    # pytest >= 9.2 rejects a bad bool ini value itself, before the plugin reads it.
    result.stderr.re_match_lines(
        [r"ERROR: (depfence: ini key depfence_require: .*|invalid truth value )'maybe'.*"]
    )
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


def test_both_policy_kinds_on_the_command_line_are_rejected(run, pytester):
    pytester.makepyfile(test_x=SIDE_EFFECT)

    result = run("--depfence-no-egress", "github.com", "--depfence-egress-only", "mirror.internal")

    assert_stopped_before_tests(result, pytester)
    result.stderr.fnmatch_lines(
        ["ERROR: depfence: *CLI flag --depfence-no-egress*CLI flag --depfence-egress-only*"]
    )


@pytest.mark.parametrize("marker", ['no_egress("github.com")', 'fence(mode="audit")'])
def test_a_marker_on_a_test_that_is_not_fenced_is_an_error(run, pytester, marker):
    path = pytester.makepyfile(
        test_unfenced=SIDE_EFFECT
        + f"""
import pytest

@pytest.mark.{marker}
def test_deploy():
    pass
"""
    )

    result = run()

    assert_stopped_before_tests(result, pytester)
    name = marker.split("(")[0]
    source = f"marker at test_unfenced.py:{line_of(path, '@pytest.mark.')}"
    result.stderr.fnmatch_lines(
        [f"test_unfenced.py::test_deploy: {message(ConfigError(f'{name}(...)', UNFENCED, source))}"]
    )


@pytest.mark.parametrize(
    ("typo", "meant"),
    [("no_egres", "no_egress"), ("egress_onyl", "egress_only"), ("fences", "fence")],
)
def test_a_misspelt_marker_is_an_error_naming_the_intended_one(run, pytester, typo, meant):
    path = pytester.makepyfile(
        test_typo=SIDE_EFFECT
        + f"""
import pytest

@pytest.mark.{typo}("github.com")
def test_deploy(fenced):
    pass
"""
    )

    result = run()

    assert_stopped_before_tests(result, pytester)
    source = f"marker at test_typo.py:{line_of(path, '@pytest.mark.')}"
    error = ConfigError(f"{typo}(...)", f"no such marker; did you mean {meant}?", source)
    result.stderr.fnmatch_lines([f"test_typo.py::test_deploy: {message(error)}"])


def test_a_registered_marker_that_looks_like_ours_is_left_alone(run, pytester):
    pytester.makeini("[pytest]\nmarkers =\n    fences: the project's own marker\n")
    pytester.makepyfile(
        test_own="""
import pytest

@pytest.mark.fences
def test_deploy():
    pass
"""
    )

    run().assert_outcomes(passed=1)
