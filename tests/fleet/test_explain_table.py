"""The device page's explain table comes from the latest plain ``select`` a device answered;
what the device wrote there is checked like meta, so a hostile answer shows no table."""

from agent.fleet.web import _explained


def answered(args: dict, result) -> dict:
    return {"op": "select", "args": args, "ok": True, "result": result}


def test_latest_plain_select_is_shown_and_what_ifs_and_bad_answers_are_not():
    table = [{"quant": "Q4_K_M", "verdict": "chosen", "size": 1024}]
    what_if = answered({"pin": "Q2_K"}, {"candidates": [{"quant": "Q2_K", "verdict": "chosen"}]})
    plain = answered({"pin": None, "profile": None}, {"candidates": table})
    assert _explained([plain])[0]["verdict"] == "chosen"
    commands = [what_if, {"op": "bench", "args": {}, "ok": True, "result": {}},
                answered({}, {"candidates": table})]
    assert _explained(commands)[0]["quant"] == "Q4_K_M"
    assert _explained([answered({}, {"candidates": [{"quant": 7}]})]) == []
    assert _explained([answered({}, {"candidates": [{"quant": "x"}] * 257})]) == []
    assert _explained([answered({}, "not a table"), what_if]) == []
