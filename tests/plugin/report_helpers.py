"""Helpers for the audit, contract and report tests: deploy scripts, and reading what an
inner session wrote (the JSON report, checked against its schema; JUnit XML, checked
against an xunit2 schema; GitHub workflow commands).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import xmlschema

from pytest_depfence.report import FORMAT, SCHEMA_PATH

#: JUnit XML as pytest's default junit_family (xunit2) must be: no <properties> in a
#: <testcase>. Our own schema (data/junit-xunit2.xsd, see its header).
JUNIT_XSD = Path(__file__).with_name("data") / "junit-xunit2.xsd"


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


def junit_errors(path: Path) -> list[str]:
    """Why the JUnit XML at `path` is not valid xunit2 ([] when it is)."""
    schema = xmlschema.XMLSchema(JUNIT_XSD)
    return [f"{e.path}: {e.reason}" for e in schema.iter_errors(str(path))]


def junit_suite_properties(path: Path) -> dict[str, str]:
    """The <property> elements of the <testsuite> itself (record_testsuite_property)."""
    suite = ET.parse(path).getroot().find("testsuite")
    assert suite is not None, f"no <testsuite> in {path}"
    return {p.get("name", ""): p.get("value", "") for p in suite.findall("properties/property")}


def workflow_commands(result: pytest.RunResult) -> list[str]:
    """The GitHub workflow commands (`::error ...`, `::notice ...`) an inner session printed."""
    return [line for line in result.stdout.lines if line.startswith("::")]
