"""The session's settings: CLI flags and ini keys, declared and merged (CLI over ini).

Descriptions and validation come from `pytest_depfence.options`, shared with
the library and the `depfence` command; a bad value is a usage error naming
the flag or ini key it came from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

from .. import options
from ..errors import ConfigError, PolicyError

if TYPE_CHECKING:
    from ..fence import Fence
    from ..lab import Lab
    from ..policy import Policy

POLICY_KEY = pytest.StashKey["Policy"]()
FENCE_KWARGS_KEY = pytest.StashKey[dict[str, Any]]()
SETTINGS_KEY = pytest.StashKey["Settings"]()
LAB_KEY: pytest.StashKey[Lab] = pytest.StashKey()
FENCE_KEY: pytest.StashKey[Fence] = pytest.StashKey()
RUNS_KEY: pytest.StashKey[tuple[list[dict[str, Any]], list[str]]] = pytest.StashKey()
#: Why the test's fence could not be built (the skip or failure message).
UNAVAILABLE_KEY = pytest.StashKey[str]()

#: Variables that mark a CI job: there a fence that cannot be built fails the fenced tests
#: (a skipped proof must not read as a green one) unless the user opts out.
CI_VARIABLES = ("GITHUB_ACTIONS", "CI")
#: Added to the failure when the requirement comes from the CI environment.
REQUIRED_IN_CI = (
    "fenced tests fail rather than skip in CI ({variable}={value}); "
    "--depfence-no-require (ini: depfence_require = false) skips them instead"
)

_STORE_TRUE: dict[str, Any] = {"action": "store_true", "default": None}

#: (flag, ini type, help, argparse keywords): each is a CLI flag and an ini key.
FLAGS: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("--depfence-upstream", "string", options.UPSTREAM.help, {"metavar": "HOST[:PORT]"}),
    (
        "--depfence-no-egress",
        "linelist",
        "pattern fenced runs must not reach, for tests without a policy marker; repeatable",
        {"action": "append", "metavar": "PATTERN"},
    ),
    (
        "--depfence-egress-only",
        "linelist",
        "pattern fenced runs may reach (all else is blocked), for tests without a policy "
        "marker; repeatable",
        {"action": "append", "metavar": "PATTERN"},
    ),
    ("--depfence-mode", "string", options.MODE.help, {"metavar": "MODE"}),
    (
        "--depfence-ranges",
        "paths",
        options.RANGES.help + ", for tests without fence(ranges=...); repeatable (flag: "
        "relative to the current directory; ini: to the ini file's)",
        {"action": "append", "metavar": "FILE"},
    ),
    *(
        (
            f"--depfence-{name}",
            "string",
            f"{options.OPTIONS[name].help}, for tests without fence({name}=...)",
            {"metavar": metavar},
        )
        for name, metavar in (("memory", "SIZE"), ("cpus", "CPUS"), ("pids", "N"))
    ),
    (
        "--depfence-require",
        "bool",
        "fail fenced tests when the fence cannot be built, instead of skipping them "
        "(the default in CI: CI or GITHUB_ACTIONS set)",
        _STORE_TRUE,
    ),
    (
        "--depfence-no-require",
        "",
        "skip fenced tests when the fence cannot be built, also in CI (where they fail by "
        "default: CI or GITHUB_ACTIONS set)",
        {"action": "store_false", "dest": "depfence_require", "default": None},
    ),
    (
        "--depfence-report",
        "string",
        "write one JSON report of every fenced run of the session to PATH "
        "(schema: pytest_depfence/report.schema.json)",
        {"metavar": "PATH"},
    ),
    (
        "--depfence-update-contracts",
        "bool",
        "write or rewrite the contracts of the tests that ran instead of checking them",
        _STORE_TRUE,
    ),
    (
        "--depfence-lab",
        "bool",
        "run the session inside the built-in test lab: a private network namespace with "
        "fake github.com, mirror.internal, ... and its own DNS server as upstream",
        _STORE_TRUE,
    ),
)


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("depfence", "dependency fence (pytest-depfence)")
    for flag, ini_type, help, kwargs in FLAGS:
        if not ini_type:  # the opposite of another flag: its dest is that flag's
            group.addoption(flag, help=help, **kwargs)
            continue
        name = flag[2:].replace("-", "_")
        group.addoption(flag, dest=name, help=f"{help} (ini: {name})", **kwargs)
        parser.addini(name, help=help, type=ini_type, default=None)  # type: ignore[arg-type]


@dataclass
class Settings:
    """Session-wide settings after CLI and ini were merged (CLI wins)."""

    upstream: str | None
    upstream_source: str
    policy: Policy | None
    mode: str
    require: bool
    #: Why fenced tests fail when no fence can be built, when only the CI environment says so.
    required_in_ci: str | None
    lab: bool
    report: str | None
    update_contracts: bool
    #: Ranges files (ranges.Ranges) for tests whose marker names none, read at session start.
    ranges: tuple[Any, ...] = ()
    #: Limits (memory, cpus, pids) for tests whose marker sets none, checked.
    limits: dict[str, Any] = field(default_factory=dict)


def _setting(config: pytest.Config, name: str) -> tuple[Any, str]:
    """A value and where it came from: CLI flag over ini key; (None, '') when neither is set."""
    value = config.getoption(name)
    if value not in (None, []):
        return value, f"CLI flag --{name.replace('_', '-')}"
    try:
        value = config.getini(name)
    except ValueError as exc:
        # pytest's own conversion (a bool key set to "maybe") would be an INTERNALERROR.
        raise pytest.UsageError(f"depfence: ini key {name}: {exc}") from None
    if value not in (None, [], ""):
        return value, f"ini key {name}"
    return None, ""


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _configured_policy(config: pytest.Config) -> Policy | None:
    """The session's default policy: CLI flags, else ini keys; one kind per level."""
    levels = (
        ("CLI flag --depfence-no-egress", "CLI flag --depfence-egress-only", config.getoption),
        ("ini key depfence_no_egress", "ini key depfence_egress_only", config.getini),
    )
    for ne_source, eo_source, get in levels:
        no_egress = get("depfence_no_egress")
        egress_only = get("depfence_egress_only")
        if no_egress and egress_only:
            raise pytest.UsageError(
                f"depfence: both {ne_source} and {eo_source} are set; choose one policy kind"
            )
        if no_egress or egress_only:
            from ..policy import Policy  # only when a pattern is set

            if no_egress:
                return Policy.no_egress(*no_egress, source=ne_source)
            return Policy.egress_only(*egress_only, source=eo_source)
    return None


def load_settings(config: pytest.Config) -> Settings:
    """Merge and check CLI flags and ini keys; a bad value is a usage error naming its source.

    Runs at session start rather than in pytest_configure, so that `pytest --help`
    and `pytest --markers` still work when an ini key holds a bad value.
    """
    try:
        upstream, upstream_source = _setting(config, "depfence_upstream")
        if upstream is not None:
            options.validate("upstream", upstream, upstream_source)
        mode, mode_source = _setting(config, "depfence_mode")
        if mode is not None:
            options.validate("mode", mode, mode_source)
        require, required_in_ci = _require(config)
        ranges, ranges_source = _setting(config, "depfence_ranges")
        if ranges is not None:
            # Flag paths: from where pytest was started; ini paths: pytest made them absolute.
            here = config.invocation_params.dir
            paths = [os.path.join(here, p) for p in ranges]
            ranges = options.validate("ranges", paths, ranges_source)
        limits = {}
        for name in options.LIMIT_OPTIONS:
            value, source = _setting(config, f"depfence_{name}")
            if value is not None:
                limits[name] = options.validate(name, value, source)
        return Settings(
            upstream=upstream,
            upstream_source=upstream_source,
            policy=_configured_policy(config),
            mode=mode or "block",
            require=require,
            required_in_ci=required_in_ci,
            lab=_bool(_setting(config, "depfence_lab")[0] or False),
            report=_setting(config, "depfence_report")[0],
            update_contracts=_bool(_setting(config, "depfence_update_contracts")[0] or False),
            ranges=ranges or (),
            limits=limits,
        )
    except (PolicyError, ConfigError) as exc:
        raise pytest.UsageError(f"depfence: {exc}") from None


def ci_variable(environ: Mapping[str, str] = os.environ) -> tuple[str, str] | None:
    """The variable (and its value) that says this is a CI job, if one does."""
    for name in CI_VARIABLES:
        value = environ.get(name, "")
        if value.strip().lower() not in ("", "0", "false", "no", "off"):
            return name, value
    return None


def _require(config: pytest.Config) -> tuple[bool, str | None]:
    """Whether a fence that cannot be built fails the fenced tests: the CLI flag or ini
    key when set either way, else yes in CI; and the CI text when only CI says so."""
    value, _ = _setting(config, "depfence_require")
    if value is not None:
        return _bool(value), None
    ci = ci_variable()
    if ci is None:
        return False, None
    return True, REQUIRED_IN_CI.format(variable=ci[0], value=ci[1])


def is_xdist_controller(config: pytest.Config) -> bool:
    return bool(getattr(config.option, "dist", "no") != "no") and not hasattr(config, "workerinput")
