"""The built wheel carries what an install outside this repository needs.

The wheel is built once (pip, the project's build backend from pyproject.toml),
its contents and metadata are read, and it is installed into a scratch
directory that a separate interpreter imports from a directory outside the
checkout: the eBPF sources are found inside the package, the version comes
from the metadata, and `python -m pytest_depfence` is the command.
"""

from __future__ import annotations

import email.parser
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import pytest_depfence

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"
URL = "https://github.com/pytest-depfence/pytest-depfence"


def pyproject_version() -> str:
    found = re.search(r'^version = "([^"]+)"$', PYPROJECT.read_text(), re.M)
    assert found, "pyproject.toml has a static version"
    return found[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        # No build isolation: the backend is in the test extra, so nothing is downloaded.
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + [str(ROOT), "-w", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (built,) = out.glob("pytest_depfence-*.whl")
    return built


@pytest.fixture(scope="module")
def names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


@pytest.fixture(scope="module")
def metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as zf:
        (path,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(zf.read(path).decode())


def test_wheel_carries_every_ebpf_source(names):
    sources = sorted(p.name for p in (ROOT / "bpf").iterdir() if p.suffix in (".c", ".h"))
    assert "depfence.c" in sources
    shipped = sorted(n.split("/")[-1] for n in names if n.startswith("pytest_depfence/bpf/"))
    assert shipped == sources


def test_wheel_carries_license_types_and_schema(names):
    assert "pytest_depfence/py.typed" in names
    assert "pytest_depfence/report.schema.json" in names
    assert "pytest_depfence/__main__.py" in names
    assert [n for n in names if n.endswith(".dist-info/licenses/LICENSE")], names
    assert not [n for n in names if n.startswith(("tests/", "examples/", "bench/"))]


def test_wheel_metadata(metadata):
    assert metadata["Version"] == pyproject_version()
    assert metadata["License"] == "MIT"
    assert metadata["Requires-Python"] == ">=3.9"
    urls = dict(u.split(", ", 1) for u in metadata.get_all("Project-URL"))
    assert urls == {
        "Homepage": URL,
        "Source": URL,
        "Issues": f"{URL}/issues",
        "Changelog": f"{URL}/blob/main/CHANGELOG.md",
    }
    classifiers = set(metadata.get_all("Classifier"))
    wanted = {f"Programming Language :: Python :: 3.{minor}" for minor in range(9, 14)} | {
        "Framework :: Pytest",
        "Operating System :: POSIX :: Linux",
        "Development Status :: 3 - Alpha",
        "License :: OSI Approved :: MIT License",
    }
    assert wanted <= classifiers


def test_the_report_schema_and_the_urls_agree():
    schema = (ROOT / "pytest_depfence" / "report.schema.json").read_text()
    assert f'"$id": "{URL}/' in schema


def test_license_file():
    lines = (ROOT / "LICENSE").read_text().splitlines()
    assert lines[0] == "MIT License"
    assert "Copyright (c) 2026 the pytest-depfence authors" in lines


def test_changelog_has_the_release_and_what_is_unreleased():
    headings = re.findall(r"^## (.+)$", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert headings[:2] == ["[Unreleased]", f"[{pyproject_version()}] — unreleased"]


def test_installed_wheel_works_outside_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), wheel],
        check=True,
        capture_output=True,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = (
        "import pytest_depfence as p; from pytest_depfence.kernel import bpf_source_dir; "
        "print(p.__file__); print(bpf_source_dir()); print(p.__version__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    module, sources, version = out.stdout.split("\n")[:3]
    assert module.startswith(str(target)), "imported the wheel, not the checkout"
    assert sources == str(target / "pytest_depfence" / "bpf")
    assert version == pyproject_version()
    cli = subprocess.run(
        [sys.executable, "-m", "pytest_depfence", "--version"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert cli.stdout == f"depfence {pyproject_version()}\n", cli.stderr


def test_version_is_the_metadata_s():
    assert pytest_depfence.__version__ == pyproject_version()
    assert "__version__" in pytest_depfence.__all__


@pytest.mark.parametrize(
    "command",
    [["depfence"], [sys.executable, "-m", "pytest_depfence"]],
    ids=["script", "module"],
)
def test_version_flag(command):
    if command == ["depfence"]:
        script = Path(sys.executable).parent / "depfence"
        if not script.exists():
            pytest.skip(f"no depfence script beside {sys.executable}")
        command = [str(script)]
    proc = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (0, f"depfence {pytest_depfence.__version__}\n")
