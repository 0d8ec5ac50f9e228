"""The lab's one error: the lab could not be built, or was used out of order."""

from __future__ import annotations

from ..errors import DepfenceError


class LabError(DepfenceError, RuntimeError):
    """The lab could not be built, or was used out of order (entered twice, exited unentered)."""
