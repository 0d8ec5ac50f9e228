"""The pytest plugin: markers, options, the `fenced` fixture. The only package importing pytest.

Settings exist as marker, CLI flag and ini key; precedence is marker > CLI >
ini. Policies are parsed at collection time, so a bad pattern stops the run
before any test starts and names where it was written.

- `settings`: flags, ini keys and the session's merged settings;
- `markers`: what a test's markers say, and where each was written;
- `results`: after each test (audit warnings, contracts) and the session's reports.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING

import pytest

from ..errors import ConfigError, DepfenceError, FenceUnavailable, PolicyError
from .markers import MARKERS, check_fenced, check_spelling, item_fence_kwargs, item_policy
from .results import AUDITED, Reporter, after_test, plain_failure
from .settings import (
    FENCE_KEY,
    FENCE_KWARGS_KEY,
    LAB_KEY,
    POLICY_KEY,
    RUNS_KEY,
    SETTINGS_KEY,
    UNAVAILABLE_KEY,
    add_options,
    is_xdist_controller,
    load_settings,
)

if TYPE_CHECKING:
    from ..fence import Fence

__all__ = ["AUDITED", "LAB_KEY", "MARKERS", "SETTINGS_KEY", "UNAVAILABLE"]

#: Reason given when a fenced test cannot run; tests import it so text and tests agree.
UNAVAILABLE = "depfence: the fence cannot be built: {reason}"


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    for text in MARKERS.values():
        config.addinivalue_line("markers", text)
    config.pluginmanager.register(Reporter(config), "depfence-reporter")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    config = session.config
    settings = load_settings(config)
    config.stash[SETTINGS_KEY] = settings
    if not settings.lab or is_xdist_controller(config):
        return
    from ..lab import Lab

    try:
        lab = Lab()
        lab.__enter__()
    except (DepfenceError, OSError) as exc:
        raise pytest.UsageError(f"depfence: --depfence-lab: the lab cannot start: {exc}") from exc
    config.stash[LAB_KEY] = lab


def pytest_unconfigure(config: pytest.Config) -> None:
    lab = config.stash.get(LAB_KEY, None)
    if lab is not None:
        del config.stash[LAB_KEY]
        lab.__exit__(None, None, None)


def _upstream(config: pytest.Config) -> str | None:
    settings = config.stash[SETTINGS_KEY]
    if settings.upstream is not None:
        return str(settings.upstream)
    lab = config.stash.get(LAB_KEY, None)
    return lab.upstream if lab is not None else None


def pytest_report_header(config: pytest.Config) -> list[str]:
    from ..kernel import preflight

    upstream = _upstream(config) or "first nameserver of /etc/resolv.conf"
    lab = config.stash.get(LAB_KEY, None)
    if lab is not None and config.stash[SETTINGS_KEY].upstream is None:
        upstream += " (lab)"  # only when the lab's resolver is really the one in use
    try:
        state = preflight(load_bcc=False)  # found, not loaded: a session may build no fence
    except Exception as exc:  # noqa: BLE001 - a header must never stop the session
        reason = str(exc)
        if not isinstance(exc, FenceUnavailable):
            reason = f"the machine check failed: {type(exc).__name__}: {exc}"
        settings = config.stash[SETTINGS_KEY]
        fate = "fail" if settings.require else "are skipped"
        why = f" ({settings.required_in_ci})" if settings.required_in_ci else ""
        return [
            UNAVAILABLE.format(reason=reason),
            f"depfence: fenced tests {fate}{why}; upstream {upstream}",
        ]
    return [f"depfence: {state.describe()}, upstream {upstream}"]


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    errors: list[str] = []
    registered = {line.split(":")[0].split("(")[0].strip() for line in config.getini("markers")}
    for item in items:
        try:
            check_spelling(item, registered)
            policy = item_policy(item)
            kwargs = item_fence_kwargs(item)
            check_fenced(item)
        except (PolicyError, ConfigError) as exc:
            errors.append(f"{item.nodeid}: {exc}")
            continue
        if policy is not None:
            item.stash[POLICY_KEY] = policy
        item.stash[FENCE_KWARGS_KEY] = kwargs
    if errors:
        raise pytest.UsageError("depfence: invalid fence configuration\n" + "\n".join(errors))


@pytest.fixture
def fenced(request: pytest.FixtureRequest) -> Iterator[Fence]:
    """A Fence configured from the test's markers, then CLI flags, then ini keys.

    `fenced.run(cmd)` runs the command inside the fence; a forbidden egress
    attempt raises EgressViolation naming the domain and the command line.
    """
    settings = request.config.stash[SETTINGS_KEY]
    fence = _open_fence(request)
    if isinstance(fence, FenceUnavailable):
        # Outside the `except` that caught it, so the reason is said once, unchained.
        message = UNAVAILABLE.format(reason=fence)
        request.node.stash[UNAVAILABLE_KEY] = message
        if settings.require:
            why = f"\n{settings.required_in_ci}" if settings.required_in_ci else ""
            pytest.fail(message + why, pytrace=False)
        pytest.skip(message)
    request.node.stash[FENCE_KEY] = fence
    try:
        yield fence
    finally:
        fence.close()


def _open_fence(request: pytest.FixtureRequest) -> Fence | FenceUnavailable:
    """The test's fence, open; or why it cannot be built."""
    from ..fence import Fence
    from ..kernel import load
    from ..policy import Policy

    config = request.config
    settings = config.stash[SETTINGS_KEY]
    try:
        load()
    except FenceUnavailable as exc:
        return exc
    node = request.node
    policy = node.stash.get(POLICY_KEY, None) or settings.policy or Policy("no_egress", ())
    kwargs = {"mode": settings.mode, **node.stash.get(FENCE_KWARGS_KEY, {})}
    kwargs.pop("contract", None)  # checked after the test, by pytest_runtest_call
    label = "".join(c if c.isalnum() else "-" for c in node.name)[:40] or "test"
    try:
        fence = Fence(policy, upstream=_upstream(config), label=label, **kwargs)
    except ConfigError as exc:
        pytest.fail(f"depfence: {exc}", pytrace=False)
    try:
        # The programs loaded, but the cgroup tree can still be out of reach.
        fence.open()
    except FenceUnavailable as exc:
        fence.close()
        return exc
    return fence


# -- after each fenced test: audit warnings, contract, what the reports need ----------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    __tracebackhide__ = True  # a contract failure points at the test, not here
    try:
        result = yield
    except BaseException:
        after_test(item, passed=False)
        raise
    after_test(item, passed=True)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if call.when == "call":
        plain_failure(report, call)
    if call.when == "setup" and UNAVAILABLE_KEY in item.stash:
        setattr(report, "depfence_unavailable", item.stash[UNAVAILABLE_KEY])  # noqa: B010
    recorded = item.stash.get(RUNS_KEY, None)
    if call.when == "call" and recorded is not None:
        # Plain data: pytest-xdist carries it from a worker to the controller as it is.
        runs, notes = recorded
        setattr(report, "depfence_runs", runs)  # noqa: B010 - an attribute pytest lacks
        setattr(report, "depfence_notes", notes)  # noqa: B010
    return report
