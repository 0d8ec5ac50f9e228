"""The tests a team writes for its deploy scripts (run with --depfence-lab here).

Each test runs a deploy script fenced: if the script, or any tool it starts,
asks for github.com or a name below githubusercontent.com, the test fails and
names the domain and the command line that asked.
"""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from pytest_depfence import EgressViolation
from pytest_depfence.cgroup import cgroup2_mount, kill_all

DEPLOY = Path(__file__).resolve().parent / "deploy"
TOOLS = Path(__file__).resolve().parent / "tools"
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


# The transient kind: transient.sh only asks the migrations service to migrate;
# the service is what downloads from github.com. Fence the service too, and the
# test names it, and who called it.
@pytest.mark.no_egress(*CIRCULAR)
def test_transient_dependency_names_the_service_and_its_caller(fenced):
    fenced.service(
        [TOOLS / "migrations-service", "--listen", "127.0.0.1:8080"], name="migrations", ready=8080
    )
    result = fenced.run([DEPLOY / "transient.sh"], check=False)
    assert result.returncode != 0  # the service could not migrate without GitHub
    chains = {(v.service, v.domain, v.called_by[0][1].split()[0]) for v in result.violations}
    assert chains == {("migrations", "github.com", "curl")}


@pytest.mark.xfail(raises=EgressViolation, strict=True, reason="migrations come from github.com")
@pytest.mark.no_egress(*CIRCULAR)
def test_transient_deploy_has_no_circular_dependency(fenced):
    fenced.service(
        [TOOLS / "migrations-service", "--listen", "127.0.0.1:8081"], name="migrations", ready=8081
    )
    fenced.run(
        [DEPLOY / "transient.sh"], env={**os.environ, "MIGRATIONS_URL": "http://127.0.0.1:8081"}
    )


# A service that already runs on the machine (docker.service, a migrations unit)
# is adopted for each run instead: the fence judges its egress while the run
# lasts and never stops it. Here a cgroup named like a unit stands in for one.
@pytest.fixture
def migrations_unit():
    unit = cgroup2_mount() / "depfence-example.slice" / "migrations.service"
    unit.mkdir(parents=True)
    service = subprocess.Popen(
        [TOOLS / "migrations-service", "--listen", "127.0.0.1:8082"],
        stdout=subprocess.PIPE,
        preexec_fn=lambda: (unit / "cgroup.procs").write_text(str(os.getpid())),
    )
    service.stdout.readline()  # "migrations-service: listening on ...": it accepts now
    yield "http://127.0.0.1:8082"
    service.terminate()
    service.wait(timeout=10)
    kill_all(unit)
    unit.rmdir()
    unit.parent.rmdir()


@pytest.mark.xfail(raises=EgressViolation, strict=True, reason="migrations come from github.com")
@pytest.mark.no_egress(*CIRCULAR)
@pytest.mark.fence(services=["migrations.service"])
def test_transient_deploy_with_the_running_service_adopted(migrations_unit, fenced):
    fenced.run([DEPLOY / "transient.sh"], env={**os.environ, "MIGRATIONS_URL": migrations_unit})
