from agent.mqtt.idempotency import RecentRequests


def test_duplicates_are_seen_in_flight_then_finished():
    recent = RecentRequests(capacity=4)
    assert recent.admit("a").seen == "new"
    assert recent.admit("a").seen == "in_flight"
    recent.finish("a", b"final-a")
    again = recent.admit("a")
    assert (again.seen, again.final) == ("finished", b"final-a")


def test_oldest_finished_ids_are_forgotten_before_in_flight_ones():
    recent = RecentRequests(capacity=3)
    recent.admit("busy")
    for key in ("f1", "f2", "f3"):
        recent.admit(key)
        recent.finish(key, key.encode())
    assert len(recent) == 3
    assert recent.admit("busy").seen == "in_flight"
    assert recent.admit("f1").seen == "new"  # evicted, so treated as a new request


def test_forget_allows_a_retry():
    recent = RecentRequests()
    recent.admit("x")
    recent.forget("x")
    assert recent.admit("x").seen == "new"
