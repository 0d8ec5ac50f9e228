"""A run's teardown and its event delivery, without root."""

from __future__ import annotations

import threading

import pytest

from pytest_depfence.events import EgressEvent
from pytest_depfence.run import Delivery, Teardown


def event(n: int) -> EgressEvent:
    return EgressEvent(f"host{n}.test", None, 53, "udp", "allowed", None, None, n, "curl")


def test_teardown_runs_every_step_last_first_and_raises_the_first_error() -> None:
    done: list[str] = []

    def failing(name: str) -> None:
        done.append(name)
        raise RuntimeError(name)

    teardown = Teardown()
    teardown.push(lambda: done.append("rmdir"))
    teardown.push(lambda: failing("drain"))
    teardown.push(lambda: failing("kill"))
    with pytest.raises(RuntimeError, match="kill"):
        teardown.close()
    assert done == ["kill", "drain", "rmdir"]
    teardown.close()  # nothing left to undo
    assert done == ["kill", "drain", "rmdir"]


def test_teardown_as_a_context_manager_runs_after_an_error_in_the_body() -> None:
    done: list[str] = []
    with pytest.raises(ValueError, match="body"), Teardown() as teardown:
        teardown.push(lambda: done.append("cleanup"))
        raise ValueError("body")
    assert done == ["cleanup"]


def test_delivery_calls_back_in_order_on_a_thread_of_its_own() -> None:
    seen: list[tuple[int | None, str]] = []
    caller = threading.current_thread().name
    delivery = Delivery(lambda e: seen.append((e.pid, threading.current_thread().name)))
    for n in range(50):
        delivery.put(event(n))
    delivery.close()
    assert [pid for pid, _ in seen] == list(range(50))
    assert {name for _, name in seen} == {"depfence-on-event"} != {caller}
    assert delivery.error is None


def test_a_slow_callback_does_not_hold_up_the_sender() -> None:
    release = threading.Event()
    delivery = Delivery(lambda e: release.wait(5))
    for n in range(3):
        delivery.put(event(n))  # returns at once although the callback is blocked
    release.set()
    delivery.close()


def test_delivery_keeps_the_first_callback_error_and_stops_calling() -> None:
    calls: list[int | None] = []

    def callback(e: EgressEvent) -> None:
        calls.append(e.pid)
        raise KeyError(e.pid)

    delivery = Delivery(callback)
    for n in range(3):
        delivery.put(event(n))
    delivery.close()
    assert calls == [0]
    assert isinstance(delivery.error, KeyError)
