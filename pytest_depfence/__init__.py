"""pytest-depfence: prove a deploy script does not depend on the hosts it must not need.

The library works without pytest; `pytest_depfence.plugin` is the only module
that imports pytest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    CommandFailed,
    ConfigError,
    ContractError,
    DepfenceError,
    EgressAuditWarning,
    EgressViolation,
    FenceUnavailable,
    PolicyError,
    ServiceNotReady,
    ServiceViolation,
)
from .events import EgressEvent, FenceResult

if TYPE_CHECKING:
    from .fence import Fence
    from .policy import Policy

__all__ = [
    "CommandFailed",
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
    "ServiceNotReady",
    "ServiceViolation",
    "__version__",
]

#: The distribution whose metadata holds the version (pyproject.toml's, the one source).
DISTRIBUTION = "pytest-depfence"


def __getattr__(name: str) -> Any:
    # Fence, Policy and the version load on first use so that `pytest --help` never pays.
    if name == "__version__":
        return _version()
    if name == "Fence":
        from .fence import Fence

        return Fence
    if name == "Policy":
        from .policy import Policy

        return Policy
    raise AttributeError(name)


def _version() -> str:
    """The installed distribution's version: pyproject.toml's, read from the metadata."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"
