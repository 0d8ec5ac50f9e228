"""`python -m pytest_depfence`: the `depfence` command, for when its script is not on PATH
(`sudo` resets PATH; `sudo .venv/bin/python -m pytest_depfence doctor` always works)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
