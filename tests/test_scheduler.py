"""The pure scheduler: priority, model affinity within a look-ahead, no starvation."""

from paletta_server.jobs.scheduler import Scheduler

LOW, NORMAL, HIGH = 1, 2, 3


def drain(s: Scheduler, resident=lambda key: False) -> list[str]:
    order = []
    while (job := s.pick(resident)) is not None:
        order.append(job)
    return order


def test_priority_then_arrival():
    s = Scheduler()
    s.add("a", NORMAL, "m")
    s.add("b", HIGH, "m")
    s.add("c", NORMAL, "m")
    s.add("d", LOW, "m")
    assert drain(s) == ["b", "a", "c", "d"]


def test_prefers_resident_model_within_lookahead():
    s = Scheduler(lookahead=2)
    s.add("cold", NORMAL, "flux-fill")
    s.add("warm", NORMAL, "flux-schnell")
    assert s.pick(lambda key: key == "flux-schnell") == "warm"
    assert s.pick(lambda key: key == "flux-schnell") == "cold"


def test_affinity_is_bounded_by_lookahead():
    s = Scheduler(lookahead=1)
    for name in ("a", "b", "warm"):
        s.add(name, NORMAL, "cold" if name != "warm" else "hot")
    assert s.pick(lambda key: key == "hot") == "a"


def test_affinity_never_jumps_a_higher_priority():
    s = Scheduler(lookahead=4)
    s.add("urgent", HIGH, "cold")
    s.add("warm", NORMAL, "hot")
    assert s.pick(lambda key: key == "hot") == "urgent"


def test_passed_over_job_runs_after_max_skips():
    s = Scheduler(lookahead=8, max_skips=3)
    s.add("cold", NORMAL, "cold")
    for i in range(10):
        s.add(f"warm{i}", NORMAL, "hot")
    order = drain(s, lambda key: key == "hot")
    assert order.index("cold") == 3


def test_low_priority_does_not_starve_behind_a_stream_of_high():
    s = Scheduler(max_skips=2)
    s.add("low", LOW, "m")
    ran = []
    for i in range(20):
        s.add(f"high{i}", HIGH, "m")
        ran.append(s.pick(lambda key: True))
        if "low" in ran:
            break
    assert "low" in ran and len(ran) <= 6


def test_position_and_remove():
    s = Scheduler()
    s.add("a", NORMAL, "m")
    s.add("b", HIGH, "m")
    assert s.position("a") == 1 and s.position("b") == 0
    assert s.remove("b") and not s.remove("b")
    assert s.position("a") == 0 and len(s) == 1
