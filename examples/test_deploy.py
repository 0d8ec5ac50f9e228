"""The tests a team writes for its deploy scripts (run with --depfence-lab here).

Each test runs a deploy script fenced: if the script, or any tool it starts,
asks for github.com or a name below githubusercontent.com, the test fails and
names the domain and the command line that asked.
"""

import shlex
from pathlib import Path

import pytest

from pytest_depfence import EgressViolation

DEPLOY = Path(__file__).resolve().parent / "deploy"
# Deploying a fix for GitHub must not need GitHub.
CIRCULAR = ("github.com", "*.githubusercontent.com")


@pytest.mark.no_egress(*CIRCULAR)
def test_clean_deploy_has_no_circular_dependency(fenced):
    result = fenced.run([DEPLOY / "clean.sh"])
    assert result.returncode == 0
    assert result.domains == ["mirror.internal"]


# Known circular dependencies are kept visible with a strict xfail: the day
# the script is fixed, the xfail turns into a failure that asks to remove it.
@pytest.mark.xfail(raises=EgressViolation, strict=True, reason="downloads its tool from github.com")
@pytest.mark.no_egress(*CIRCULAR)
def test_direct_deploy_has_no_circular_dependency(fenced):
    fenced.run([DEPLOY / "direct.sh"])


@pytest.mark.xfail(raises=EgressViolation, strict=True, reason="deploy-helper checks for updates")
@pytest.mark.no_egress(*CIRCULAR)
def test_hidden_deploy_has_no_circular_dependency(fenced):
    fenced.run([DEPLOY / "hidden.sh"])


@pytest.mark.no_egress(*CIRCULAR)
def test_hidden_dependency_names_the_tool_that_asked(fenced):
    result = fenced.run([DEPLOY / "hidden.sh"], check=False)
    assert result.returncode == 0  # the deploy "works": only the fence sees the dependency
    [(domain, cmdline)] = {(v.domain, v.cmdline) for v in result.violations}
    assert domain == "api.github.com"
    # argv[0] is whichever python3 PATH found (a pyenv shim execs its full path).
    interpreter, *args = shlex.split(cmdline)
    assert Path(interpreter).name == "python3"
    helper = DEPLOY.parent / "tools" / "deploy-helper"
    assert args == [str(helper), "--artifact", "http://mirror.internal/tool.tgz"]
