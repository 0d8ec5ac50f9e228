"""Helpers for the audit, contract and report tests: deploy scripts, and reading what an
inner session wrote (the JSON report, checked against its schema; JUnit properties).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import jsonschema

from pytest_depfence.report import FORMAT, SCHEMA_PATH

#: The environment that switches GitHub output on; inner runs inherit ours.


def write_script(path: Path, *lines: str) -> Path:
    """An executable /bin/sh script; `set -e`, so a failing step fails the run."""
    path.write_text("#!/bin/sh\nset -e\n" + "".join(f"{line}\n" for line in lines))
    path.chmod(0o755)
    return path


def schema_validator() -> Any:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def read_report(path: Path) -> dict[str, Any]:
    """The JSON report at `path`, after checking it against report.schema.json."""
    assert path.is_file(), f"no report at {path}"
    report = json.loads(path.read_text(encoding="utf-8"))
    errors = [
        f"{list(e.absolute_path)}: {e.message}" for e in schema_validator().iter_errors(report)
    ]
    assert errors == [], "the report does not match report.schema.json:\n" + "\n".join(errors)
    assert report["format"] == FORMAT
    return report


def by_test_id(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    ids = [t["test_id"] for t in report["tests"]]
    assert len(ids) == len(set(ids)), f"a test is in the report twice: {ids}"
    return {t["test_id"]: t for t in report["tests"]}


def violations(test: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for run in test["runs"] for v in run["violations"]]


def junit_properties(path: Path) -> dict[str, dict[str, str]]:
    """Each testcase's <property> elements, by test name (`test_x[param]`)."""
    cases = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        props = {p.get("name", ""): p.get("value", "") for p in case.iter("property")}
        cases[case.get("name", "")] = props
    return cases
