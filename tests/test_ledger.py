from agent.ledger import InFlight, ReplyRoute, RequestLedger

ROUTE = InFlight(ReplyRoute("edge/v1/d/reply/a"), stream=True)


def test_duplicates_are_seen_in_flight_then_finished():
    ledger = RequestLedger(capacity=4)
    assert ledger.admit("prompt", "a", ROUTE).seen == "new"
    assert ledger.admit("prompt", "a", ROUTE).seen == "in_flight"
    assert ledger.finish("prompt", "a", b"final-a") == ROUTE
    again = ledger.admit("prompt", "a", ROUTE)
    assert (again.seen, again.final) == ("finished", b"final-a")


def test_a_prompt_and_a_command_with_one_id_are_two_requests():
    ledger = RequestLedger()
    assert ledger.admit("prompt", "same", ROUTE).seen == "new"
    assert ledger.admit("cmd", "same").seen == "new"
    ledger.finish("cmd", "same", b"result")
    assert ledger.in_flight("same") == ROUTE and ledger.prompts_in_flight() == 1


def test_oldest_finished_ids_are_forgotten_before_in_flight_ones():
    ledger = RequestLedger(capacity=3)
    ledger.admit("prompt", "busy", ROUTE)
    for key in ("f1", "f2", "f3"):
        ledger.admit("prompt", key, ROUTE)
        ledger.finish("prompt", key, key.encode())
    assert len(ledger) == 3
    assert ledger.admit("prompt", "busy", ROUTE).seen == "in_flight"
    assert ledger.admit("prompt", "f1", ROUTE).seen == "new"  # evicted, so treated as a new request


def test_forget_allows_a_retry_and_ends_the_flight():
    ledger = RequestLedger()
    ledger.admit("prompt", "x", ROUTE)
    ledger.forget("prompt", "x")
    assert ledger.prompts_in_flight() == 0 and ledger.unanswered_prompts() == {}
    assert ledger.admit("prompt", "x", ROUTE).seen == "new"


def test_the_first_final_wins():
    ledger = RequestLedger()
    ledger.admit("prompt", "once", ROUTE)
    assert ledger.finish("prompt", "once", b"answer") == ROUTE
    assert ledger.finish("prompt", "once", b"cancelled") is None
    assert ledger.admit("prompt", "once", ROUTE).final == b"answer"
