"""pytest-depfence: prove a deploy script does not depend on the hosts it must not need.

The library works without pytest; `pytest_depfence.plugin` is the only module
that imports pytest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    ConfigError,
    ContractError,
    DepfenceError,
    EgressAuditWarning,
    EgressViolation,
    FenceUnavailable,
    PolicyError,
)
from .events import EgressEvent, FenceResult

if TYPE_CHECKING:
    from .fence import Fence
    from .policy import Policy

__all__ = [
    "ConfigError",
    "ContractError",
    "DepfenceError",
    "EgressAuditWarning",
    "EgressEvent",
    "EgressViolation",
    "Fence",
    "FenceResult",
    "FenceUnavailable",
    "Policy",
    "PolicyError",
]


def __getattr__(name: str) -> Any:
    # Fence and Policy load on first use so that `pytest --help` never pays for them.
    if name == "Fence":
        from .fence import Fence

        return Fence
    if name == "Policy":
        from .policy import Policy

        return Policy
    raise AttributeError(name)
