"""A user's project, outside this repository: the built wheel in a fresh virtualenv runs
README's first test in CI, and what the job shows is what a reviewer needs.

The wheel is built from this checkout; its dependencies come from the wheelhouse
scripts/bootstrap.sh downloads at install time, so nothing here reaches PyPI. The
inner session runs in the lab's network namespace (this test's process is in it)
with a user-supplied upstream (the lab's DNS server, not `--depfence-lab`) and the
CI variables GitHub sets.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING

import jsonschema
import pytest
import xmlschema

import pytest_depfence
from pytest_depfence.report import SCHEMA_PATH

if TYPE_CHECKING:
    from pytest_depfence.lab import Lab

if os.geteuid() != 0:
    pytest.skip("a fenced session needs root (cgroups, eBPF)", allow_module_level=True)

ROOT = Path(pytest_depfence.__file__).resolve().parent.parent
WHEELHOUSE = Path(sys.prefix) / "wheelhouse"
JUNIT_XSD = ROOT / "tests" / "plugin" / "data" / "junit-xunit2.xsd"
if not (ROOT / "pyproject.toml").is_file() or not WHEELHOUSE.is_dir():
    pytest.skip(
        f"needs the checkout and its wheelhouse ({WHEELHOUSE}): run scripts/bootstrap.sh",
        allow_module_level=True,
    )

#: What the user's deploy scripts do: mysql.sh uses the mirror only; tools.sh also
#: checks github.com for a newer release, which its allowlist does not permit.
MYSQL = '#!/bin/sh\ncurl -fsS http://mirror.internal/ >/dev/null && echo "mysql: $*"\n'
TOOLS = (
    "#!/bin/sh\ncurl -fsS http://mirror.internal/ >/dev/null\n"
    "curl -fsS https://github.com/org/tool/releases/latest >/dev/null || echo no update\n"
)


def readme_first_test() -> str:
    """The Python block under README's "A first test to copy", as a user copies it."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## A first test to copy", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README has no first test to copy"
    return match.group(1)


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)  # type: ignore[call-overload]
    assert done.returncode == 0, f"{cmd}: {done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv (the distro's Python, as bcc needs) with only the built wheel."""
    where = tmp_path_factory.mktemp("user")
    dist = where / "dist"
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + [str(ROOT), "-w", str(dist)]
    )
    [wheel] = dist.glob("pytest_depfence-*.whl")
    env = where / "venv"
    run([sys._base_executable, "-m", "venv", str(env)])  # type: ignore[attr-defined]
    run(
        [
            str(env / "bin" / "pip"),
            "install",
            "-q",
            "--disable-pip-version-check",
            "--no-index",
            "--find-links",
            str(WHEELHOUSE),
            str(wheel),
        ]
    )
    return env


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The user's repository: deploy scripts and README's first test."""
    for name, text in (("mysql.sh", MYSQL), ("tools.sh", TOOLS)):
        script = tmp_path / "deploy" / name
        script.parent.mkdir(exist_ok=True)
        script.write_text(text)
        script.chmod(0o755)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_deploy.py").write_text(readme_first_test())
    return tmp_path


def ci_session(venv: Path, project: Path, lab: Lab) -> subprocess.CompletedProcess[str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYTEST", "DEPFENCE", "GITHUB")) and key not in ("PYTHONPATH", "CI")
    }
    env.update(
        CI="true",
        GITHUB_ACTIONS="true",
        GITHUB_WORKSPACE=str(project),
        GITHUB_STEP_SUMMARY=str(project / "summary.md"),
    )
    return subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pytest", "-p", "no:cacheprovider",
         f"--depfence-upstream={lab.upstream}", "--depfence-report=report.json",
         "--junitxml=junit.xml", "tests"],
        cwd=project, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_the_wheel_runs_the_readme_test_in_ci_and_reports_what_a_reviewer_needs(
    venv: Path, project: Path, lab: Lab
) -> None:
    done = ci_session(venv, project, lab)
    out = done.stdout

    assert done.returncode == 1, out + done.stderr  # one test failed
    assert "1 failed, 1 passed" in out.splitlines()[-1], out
    where = run(
        [str(venv / "bin" / "python"), "-c", "import pytest_depfence as p; print(p.__file__)"],
        cwd=project,
    )
    assert where.stdout.startswith(str(venv)), "the session used the checkout, not the wheel"

    # The terminal: the failing test names the domain and the command line that asked.
    assert "github.com" in out and "curl -fsS https://github.com/org/tool/releases/latest" in out
    # One annotation, at the line of the run in the user's file, relative to the workspace.
    annotations = [line for line in out.splitlines() if line.startswith("::")]
    run_line = (
        readme_first_test()
        .splitlines()
        .index(next(line for line in readme_first_test().splitlines() if "tools.sh" in line))
        + 1
    )
    assert len(annotations) == 1, annotations
    assert annotations[0].startswith(
        f"::error file=tests/test_deploy.py,line={run_line},"
        "title=depfence%3A tests/test_deploy.py%3A%3Atest_only_the_mirror::github.com: "
    ), annotations[0]
    assert "by curl" in annotations[0]

    # The step summary's headline counts every fenced test, then the table names the rest.
    summary = (project / "summary.md").read_text()
    assert (
        "**2 fenced tests: 1 failed on forbidden egress, 0 contract failures, 0 could not "
        "build a fence.**" in summary
    ), summary
    assert "| `tests/test_deploy.py::test_only_the_mirror` | `github.com" in summary, summary

    # JUnit: valid xunit2 with the session's totals; the JSON report: valid, both tests.
    xmlschema.XMLSchema(JUNIT_XSD).validate(str(project / "junit.xml"))
    props = {
        p.get("name"): p.get("value")
        for p in ET.parse(project / "junit.xml").getroot().iter("property")
    }
    assert (props["depfence_tests"], props["depfence_egress_failures"]) == ("2", "1"), props
    report = json.loads((project / "report.json").read_text())
    jsonschema.validate(report, json.loads(SCHEMA_PATH.read_text()))
    outcomes = {t["test_id"]: t["outcome"] for t in report["tests"]}
    assert outcomes == {
        "tests/test_deploy.py::test_mysql_deploy_has_no_circular_dependency": "passed",
        "tests/test_deploy.py::test_only_the_mirror": "failed",
    }
