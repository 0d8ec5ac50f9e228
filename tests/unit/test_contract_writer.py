"""The one contract writer (plugin and CLI): what it says it did, and never a partial file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pytest_depfence.contract import write_contract

OLD = '# depfence contract "deploy"\n# Regenerate: x\ngithub.com  curl\n'
NEW = OLD + "mirror.internal  curl\n"


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != "deploy.contract")


def test_created_in_a_directory_it_makes(tmp_path: Path) -> None:
    target = tmp_path / "tests" / "depfence-contracts" / "deploy.contract"
    assert write_contract(target, OLD) == "created"
    assert target.read_text(encoding="utf-8") == OLD
    assert leftovers(target.parent) == []


def test_updated_when_the_text_differs(tmp_path: Path) -> None:
    target = tmp_path / "deploy.contract"
    target.write_text(OLD, encoding="utf-8")
    assert write_contract(target, NEW) == "updated"
    assert target.read_text(encoding="utf-8") == NEW
    assert leftovers(tmp_path) == []


def test_none_and_untouched_when_the_bytes_are_the_same(tmp_path: Path) -> None:
    target = tmp_path / "deploy.contract"
    target.write_text(OLD, encoding="utf-8")
    before = target.stat()
    assert write_contract(target, OLD) is None
    after = target.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_non_ascii_text_is_utf8_and_compared_as_bytes(tmp_path: Path) -> None:
    target = tmp_path / "deploy.contract"
    text = OLD + "bücher.example  curl\n"
    assert write_contract(target, text) == "created"
    assert target.read_bytes() == text.encode("utf-8")
    assert write_contract(target, text) is None


def test_a_rewritten_contract_keeps_its_permissions(tmp_path: Path) -> None:
    target = tmp_path / "deploy.contract"
    target.write_text(OLD, encoding="utf-8")
    target.chmod(0o640)
    write_contract(target, NEW)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_a_new_contract_is_readable_as_any_file_the_user_writes(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        write_contract(tmp_path / "deploy.contract", OLD)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "deploy.contract").stat().st_mode) == 0o644


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failure_leaves_the_old_contract_and_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    target = tmp_path / "deploy.contract"
    target.write_text(OLD, encoding="utf-8")

    def fail(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, fail)
    with pytest.raises(OSError, match="No space left"):
        write_contract(target, NEW)
    monkeypatch.undo()
    assert target.read_text(encoding="utf-8") == OLD
    assert leftovers(tmp_path) == []


def test_a_failure_before_any_contract_existed_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        write_contract(tmp_path / "deploy.contract", OLD)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
