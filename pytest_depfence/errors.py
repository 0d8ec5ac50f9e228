"""The exception hierarchy: every error the library raises derives from DepfenceError."""

from __future__ import annotations

from typing import Any


class DepfenceError(Exception):
    """Base class of every error pytest-depfence raises on purpose."""


class PolicyError(DepfenceError, ValueError):
    """A pattern that is not part of the policy language.

    The message names the value and where it came from (marker at file:line,
    ini key, CLI flag, library call).
    """

    def __init__(self, value: str, reason: str, source: str | None = None) -> None:
        self.value = value
        self.reason = reason
        self.source = source
        where = f" from {source}" if source else ""
        super().__init__(f"invalid egress pattern {value!r}{where}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.value, self.reason, self.source))


class ConfigError(DepfenceError, ValueError):
    """A setting (upstream, mode, timeout, ...) with a value it cannot take."""

    def __init__(self, value: str, reason: str, source: str | None = None) -> None:
        self.value = value
        self.reason = reason
        self.source = source
        where = f" from {source}" if source else ""
        super().__init__(f"invalid value {value!r}{where}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.value, self.reason, self.source))


class FenceUnavailable(DepfenceError):
    """The fence cannot be built on this machine; the message says why and what to do.

    `reason` is what is missing, `fix` (when one is known) what to run or change;
    `depfence doctor` prints them apart, everything else shows the message.
    """

    def __init__(self, reason: str, fix: str | None = None) -> None:
        self.reason = reason
        self.fix = fix
        super().__init__(f"{reason}; {fix}" if fix else reason)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason, self.fix))


class EgressViolation(DepfenceError, AssertionError):
    """A fenced run made forbidden egress attempts; the message lists every one."""

    def __init__(self, message: str, violations: list[Any] | None = None) -> None:
        super().__init__(message)
        self.violations = list(violations or [])

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.args[0], self.violations))


class ServiceViolation(EgressViolation):
    """Forbidden egress of a fenced service outside any run (at start-up, between runs):
    raised by the plugin after the test's body, since no `run()` could raise it."""


class CommandFailed(DepfenceError, AssertionError):
    """A fenced run with `check=True` whose command failed (non-zero exit, a signal, the
    timeout) without forbidden egress; like `subprocess.CalledProcessError`, it carries
    the outcome and the output."""

    def __init__(self, message: str, returncode: int, stdout: str = "", stderr: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.args[0], self.returncode, self.stdout, self.stderr))


class LimitExceeded(CommandFailed):
    """A fenced run with `check=True` that hit one of its limits (`fence(memory=, pids=)`):
    the kernel killed a process of it for memory, or refused it a fork. The message names
    the limit and the process."""


class ServiceNotReady(DepfenceError, RuntimeError):
    """A fenced service did not accept connections at its `ready=` address in time."""


class ContractError(DepfenceError, AssertionError):
    """A fenced test's egress does not match its contract, or the contract is missing or bad."""


class EgressAuditWarning(UserWarning):
    """Audit mode: a forbidden egress attempt that was recorded, not blocked."""
