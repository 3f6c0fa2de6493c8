"""The autoscaler's decisions from measured windows (broker.services.scaling)."""

from __future__ import annotations

from datetime import timedelta

from broker.config import Settings
from broker.db import utcnow
from broker.models.service import Service, ServiceWindow
from broker.services.scaling import decide

SETTINGS = Settings(service_scale_up_s=30, service_scale_down_s=120)


def service(desired: int = 2, **fields: object) -> Service:
    values: dict[str, object] = {
        "min_replicas": 1,
        "max_replicas": 4,
        "desired_replicas": desired,
        "target_queue": 2.0,
        "target_p95_ms": None,
        **fields,
    }
    return Service(**values)


def windows(seconds: float, queue: float, p95: float | None = None) -> list[ServiceWindow]:
    now = utcnow()
    return [
        ServiceWindow(
            ended_at=now - timedelta(seconds=t), seconds=5.0, queue_mean=queue, replica_p95_ms=p95
        )
        for t in range(0, int(seconds), 5)
    ][::-1]


def test_busy_for_the_whole_period_adds_a_replica() -> None:
    change = decide(service(), windows(30, queue=3.0), None, SETTINGS, utcnow())
    assert change is not None
    assert (change.desired, change.kind) == (3, "scale_up")
    assert "3.0 requests waiting per replica (target 2)" in change.reason


def test_busy_only_for_a_moment_changes_nothing() -> None:
    ws = windows(30, queue=3.0)
    ws[0].queue_mean = 0.5
    assert decide(service(), ws, None, SETTINGS, utcnow()) is None


def test_too_few_windows_change_nothing() -> None:
    assert decide(service(), windows(10, queue=9.0), None, SETTINGS, utcnow()) is None


def test_slow_replicas_add_one_too() -> None:
    change = decide(
        service(target_p95_ms=100.0), windows(30, queue=0.1, p95=250.0), None, SETTINGS, utcnow()
    )
    assert change is not None
    assert change.kind == "scale_up"
    assert "p95 time in a replica 250 ms" in change.reason


def test_a_long_calm_drops_one_and_never_below_min() -> None:
    change = decide(service(), windows(120, queue=0.1), None, SETTINGS, utcnow())
    assert change is not None
    assert (change.desired, change.kind) == (1, "scale_down")
    assert decide(service(desired=1), windows(120, queue=0.0), None, SETTINGS, utcnow()) is None


def test_never_above_max_and_a_change_waits_its_period() -> None:
    assert decide(service(desired=4), windows(30, queue=9.0), None, SETTINGS, utcnow()) is None
    just = utcnow() - timedelta(seconds=10)
    assert decide(service(), windows(30, queue=9.0), just, SETTINGS, utcnow()) is None
