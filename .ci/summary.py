"""Print what each CI step ended with, and every failed test, as the last lines of CI.

CI's log is read from its end, and the lanes print thousands of lines each, so a
failure early in the run (the native suite, the first lane) would otherwise be far
above what a reader sees. Usage: summary.py STEP=CODE[:JUNIT[:CONSOLE]] ...
A failed step with no JUnit XML (a lane that hung or did not boot) gets the last lines
of its console log instead.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

TAIL = 40


def failures(junit: Path) -> list[str]:
    """The failed and errored tests in a JUnit XML file, a line each, with the first
    line of why."""
    lines = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        for kind in ("failure", "error"):
            for bad in case.findall(kind):
                name = f"{case.get('classname', '')}::{case.get('name', '')}"
                why = (bad.get("message") or bad.text or "").strip().splitlines()
                lines.append(f"    {kind.upper():7} {name}: {why[0][:300] if why else ''}")
    return lines


def main(args: list[str]) -> int:
    print("\n=== ci: summary")
    worst = 0
    for arg in args:
        step, _, rest = arg.partition("=")
        code, _, files = rest.partition(":")
        junit, _, console = files.partition(":")
        status = "ok" if code == "0" else f"FAILED (exit {code})"
        print(f"  {step:28} {status}")
        worst = worst or int(code)
        if junit and Path(junit).is_file():
            try:
                failed = failures(Path(junit))
            except ET.ParseError as err:
                failed = [f"    {junit}: unreadable JUnit XML ({err})"]
            if failed or code != "0":
                print("\n".join(failed) or "    (no failed test in its JUnit XML)")
        elif code != "0":
            print(f"    no JUnit XML at {junit or '-'}")
            if console and Path(console).is_file():
                tail = Path(console).read_text(errors="replace").splitlines()[-TAIL:]
                print(f"    last {len(tail)} lines of {console}:")
                print("\n".join(f"    | {line}" for line in tail))
    return worst


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
