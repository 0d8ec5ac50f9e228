# shim: removed at integration
"""Temporary: what other modules import from `loader` now lives in `pytest_depfence.kernel`."""

from __future__ import annotations

from .kernel import *  # noqa: F403
from .kernel import __all__  # noqa: F401
