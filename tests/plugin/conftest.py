"""Shared helpers for the plugin-surface tests: inner pytest runs in a subprocess.

Every inner run is a real `python -m pytest` (pytester.runpytest_subprocess).
Runs that could build a fence either enter the lab (`--depfence-lab`, a private
network namespace: nothing leaves the machine) or hide bcc through
DEPFENCE_BCC_PATH, so that the fence cannot be built at all. Hiding is the
default; a test asks for the lab explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from plugin_helpers import INNER_TIMEOUT, plugin_args

from pytest_depfence.errors import FenceUnavailable
from pytest_depfence.kernel import BCC_PATH_ENV


def pytest_configure(config: pytest.Config) -> None:
    # Not `pytest_plugins = ["pytester"]`: pytest refuses that in a conftest below the
    # rootdir whenever the directory is reached by collection rather than named on the
    # command line, and plain `pytest` (the project's testpaths) does exactly that.
    if not config.pluginmanager.has_plugin("pytester"):
        config.pluginmanager.import_plugin("pytester")


RunInner = Callable[..., pytest.RunResult]


@pytest.fixture(scope="session")
def empty_bcc_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("no-bcc")


@pytest.fixture
def run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, empty_bcc_dir: Path
) -> RunInner:
    """`run(*args, lab=False)`: an inner pytest session in a subprocess, in pytester's dir.

    Without `lab`, bcc is hidden (the fence is unbuildable). With `lab`, the
    session runs in the test lab (`--depfence-lab`) and bcc is found as usual.
    """
    original = os.environ.get(BCC_PATH_ENV)

    def run(*args: str, lab: bool = False, bcc: bool | None = None) -> pytest.RunResult:
        """`bcc` (default: `lab`) leaves bcc findable; only for sessions that are in the lab."""
        if lab:
            args = ("--depfence-lab", *args)
        if lab if bcc is None else bcc:
            if original is None:
                monkeypatch.delenv(BCC_PATH_ENV, raising=False)
            else:
                monkeypatch.setenv(BCC_PATH_ENV, original)
        else:
            monkeypatch.setenv(BCC_PATH_ENV, str(empty_bcc_dir))
        return pytester.runpytest_subprocess(
            *plugin_args(), "-p", "no:cacheprovider", *args, timeout=INNER_TIMEOUT
        )

    return run


@pytest.fixture(scope="session")
def fence_buildable() -> None:
    """Skip unless this machine can build a fence (root, bcc, headers, cgroup v2, tracefs)."""
    from pytest_depfence.kernel import preflight

    try:
        preflight()
    except FenceUnavailable as exc:
        pytest.skip(f"needs a machine that can build a fence: {exc}")


@pytest.fixture
def lab_run(run: RunInner, fence_buildable: None) -> RunInner:
    """Like `run`, but the inner session is in the lab and fences are real."""

    def lab_run(*args: str) -> pytest.RunResult:
        return run(*args, lab=True)

    return lab_run


@pytest.fixture(autouse=True)
def not_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inner sessions are not CI jobs, whatever runs these tests: they must not annotate, or
    append to the summary of, a real GitHub job, and a fence they cannot build skips rather
    than fails unless a test says so; a test that wants CI sets the variables itself."""
    for name in ("GITHUB_ACTIONS", "GITHUB_STEP_SUMMARY", "CI"):
        monkeypatch.delenv(name, raising=False)
