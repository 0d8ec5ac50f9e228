"""The demo: four deploy scripts run fenced in the lab; the circular ones are caught.

All three kinds of circular dependency: direct (the script downloads from
GitHub), hidden (a tool it runs does), and transient (a service it calls does:
the migrations service runs fenced too, and the violation names it and the
chain that called it).

Run as root after scripts/bootstrap.sh:  .venv/bin/python examples/demo.py
Everything happens inside the lab's private network namespace.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pytest_depfence import Fence, Policy
from pytest_depfence.lab import Lab
from pytest_depfence.render import format_violations

DEPLOY = Path(__file__).resolve().parent / "deploy"
MIGRATIONS = Path(__file__).resolve().parent / "tools" / "migrations-service"
SCRIPTS = {
    "direct.sh": "a direct dependency: the script downloads from github.com",
    "hidden.sh": "a hidden dependency: a tool it runs checks api.github.com for updates",
    "transient.sh": "a transient dependency: the migrations service it calls downloads from "
    "github.com",
    "clean.sh": "no dependency: everything comes from mirror.internal",
}
POLICY = Policy.no_egress("github.com", "*.githubusercontent.com", source="examples/demo.py")


def main() -> int:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    caught = {}
    with Lab() as lab, Fence(POLICY, upstream=lab.upstream) as fence:
        print(f"policy: {POLICY.describe()}    upstream: {lab.upstream} (the lab's DNS)")
        service = fence.service(
            [MIGRATIONS, "--listen", "127.0.0.1:8080"], name="migrations", ready=8080
        )
        print(f"fenced service: migrations, pid {service.pid}, on 127.0.0.1:8080\n")
        for script, what in SCRIPTS.items():
            print(f"=== {script}: {what}")
            result = fence.run([DEPLOY / script], env=env, check=False)
            for line in (result.stdout + result.stderr).splitlines():
                print(f"    | {line}")
            if result.violations:
                print(format_violations(result.violations, result.command))
            else:
                print(f"  PASS: no forbidden egress (asked for: {', '.join(result.domains)})")
            print(f"  exit code {result.returncode}\n")
            caught[script] = {v.domain for v in result.violations}
    expected = {
        "direct.sh": {"github.com", "objects.githubusercontent.com"},
        "hidden.sh": {"api.github.com"},
        "transient.sh": {"github.com"},
        "clean.sh": set(),
    }
    if caught != expected:
        print(f"demo: unexpected result {caught}, expected {expected}", file=sys.stderr)
        return 1
    print("demo: the direct, hidden and transient dependencies were caught; clean.sh passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
