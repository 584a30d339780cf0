"""The watchdog's judge (daemon/service/liveness.py) on its own: a learner inside torch.compile has a bound of its own."""

from __future__ import annotations

from types import SimpleNamespace

from daemon.service.liveness import COMPILE_BOUND_S, Liveness


def training(last_progress: float, compiling_since: float | None = None) -> SimpleNamespace:
    return SimpleNamespace(last_progress=last_progress, backlog=5, compiling_since=compiling_since, alive=lambda: True)


def test_a_first_step_compiling_the_backbone_may_take_minutes_but_not_forever():
    live = Liveness(stall_after_s=120.0, export_stall_after_s=1_000.0)
    now = 10_000.0
    assert live.stalls(now, None, training(now - 60), None) == {}
    stuck = live.stalls(now, None, training(now - 300), None)
    assert "no progress for 300s" in stuck["learner"]
    assert live.stalls(now, None, training(now - 300, compiling_since=now - 300), None) == {}
    late = now - COMPILE_BOUND_S - 1
    hung = live.stalls(now, None, training(late, compiling_since=late), None)
    assert "the backbone's compilation has run for 901s" in hung["learner"]
