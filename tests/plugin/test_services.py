"""Fenced services in a user's test session (in the lab, real fence): what they did
outside any run fails the test after its body, and the JSON report has it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

MIGRATIONS = Path(__file__).resolve().parents[2] / "examples" / "tools" / "migrations-service"


def test_a_service_violating_at_start_up_fails_the_test(lab_run, pytester):
    pytester.makepyfile(
        test_service=f"""
        import time

        import pytest

        @pytest.mark.no_egress("github.com")
        def test_the_service_needs_github_to_start(fenced):
            service = fenced.service(
                [{sys.executable!r}, {str(MIGRATIONS)!r}, "--listen", "127.0.0.1:0",
                 "--fetch-at-start"],
                name="migrations",
            )
            deadline = time.monotonic() + 30
            while service.returncode is None and time.monotonic() < deadline:
                time.sleep(0.05)  # it exits when its start-up fetch fails
            assert service.returncode == 1
            fenced.run(["true"])

        @pytest.mark.no_egress("github.com")
        def test_a_quiet_service_passes(fenced):
            fenced.service(["sleep", "60"], name="idle")
            fenced.run(["true"])
        """
    )
    result = lab_run("-rf", "--depfence-report=report.json")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "ServiceViolation: 1 forbidden egress attempt while running service migrations "
            "(outside any run): *migrations-service*",
            "*blocked*github.com (*)*at dns*",
            "*in service migrations: pid [0-9]*migrations-service*",
            "FAILED test_service.py::test_the_service_needs_github_to_start*",
        ]
    )
    report = json.loads((pytester.path / "report.json").read_text())
    [failed] = [t for t in report["tests"] if "needs_github" in t["test_id"]]
    services = [r for r in failed["runs"] if r["command"].startswith("service migrations")]
    assert services and services[0]["violations"][0]["service"] == "migrations"
