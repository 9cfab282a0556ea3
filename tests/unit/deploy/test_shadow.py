"""training/deploy/shadow.py: nginx's shadow log paired by request id, the window's figures, and the judgement."""

from __future__ import annotations

import json

import pytest

from training.deploy.shadow import MIN_JUDGED, Figures, Thresholds, Window, judge, parse

THRESHOLDS = Thresholds(share=0.25, requests=200, minutes=15, min_agreement=0.75, max_p99_ratio=2.0)


def _line(side: str, request_id: str, status="200", label="cat", confidence="0.900000", time="0.020") -> str:
    return json.dumps({"side": side, "id": request_id, "status": status, "class": label, "confidence": confidence,
                       "time": time}) + "\n"


def test_a_line_is_parsed_and_what_is_not_one_is_skipped():
    request_id, side, answer = parse(_line("challenger", "a1", time="0.031"))
    assert (request_id, side, answer.status, answer.label, answer.confidence, answer.seconds) == (
        "a1", "challenger", 200, "cat", 0.9, 0.031)
    # nginx writes "-" where it has no value (no upstream answered), and both tries when it made two.
    assert parse(_line("challenger", "a1", status="504", label="", confidence="", time="5.001"))[2].confidence is None
    assert parse(_line("champion", "a1", time="0.010, 0.020"))[2].seconds == 0.02
    for bad in ("", "{", '{"id": "x"}', _line("someone", "a1"), _line("champion", "")):
        assert parse(bad) is None, bad


def test_the_window_pairs_both_answers_of_a_request_in_any_order_and_waits_for_a_torn_line(tmp_path):
    log = tmp_path / "shadow.log"
    log.write_text(_line("champion", "old"))  # an earlier window's
    window = Window.starting_now(log, warmup=0)
    with log.open("a") as f:
        f.write(_line("challenger", "a", label="dog") + _line("champion", "a") + _line("champion", "b"))
        torn = _line("challenger", "b")
        f.write(torn[:10])
    assert window.read() == 1
    champion, challenger = window.pairs[0]
    assert (champion.label, challenger.label) == ("cat", "dog")
    with log.open("a") as f:
        f.write(torn[10:] + _line("challenger", "old"))
    assert window.read() == 2  # "b" is complete now; "old" has no champion side in this window
    assert list(window.pending) == [("old", "challenger")]


def _pairs(n: int, agree: int, champion_s=0.02, challenger_s=0.03, challenger_status="200"):
    from training.deploy.shadow import Answer

    return [(Answer(200, "cat", 0.9, champion_s),
             Answer(int(challenger_status), "cat" if i < agree else "dog", 0.8, challenger_s)) for i in range(n)]


def test_figures_judge_only_requests_the_champion_answered():
    from training.deploy.shadow import Answer

    pairs = _pairs(90, agree=81) + [(Answer(400, "", None, 0.001), Answer(400, "", None, 0.001))] * 10
    f = Figures.of(pairs)
    assert (f.requests, f.agreement, f.error_share) == (90, 0.9, 0.0)
    assert (f.p99_s, f.champion_p99_s) == (0.03, 0.02)
    assert (f.confidence, f.champion_confidence) == (pytest.approx(0.8), pytest.approx(0.9))


def test_a_challenger_that_agrees_is_fast_and_answers_passes():
    passed, why = judge(Figures.of(_pairs(200, agree=180)), THRESHOLDS)
    assert passed and why.startswith("shadow passed on 200 requests: agreement 0.900, errors 0.000, p99 30 ms"), why


@pytest.mark.parametrize("pairs, reason", [
    (_pairs(200, agree=140), "agreement 0.700 < 0.75"),
    (_pairs(200, agree=200, challenger_s=0.05), "p99 50 ms = 2.50x the champion's > 2x"),
    (_pairs(198, agree=198) + _pairs(3, agree=0, challenger_status="504"), "errors 0.015 > 0.01"),
    (_pairs(MIN_JUDGED - 1, agree=MIN_JUDGED - 1), f"only {MIN_JUDGED - 1} mirrored requests"),
], ids=["disagrees", "slow", "errors", "too little traffic"])
def test_a_challenger_fails_its_shadow_saying_which_threshold(pairs, reason):
    passed, why = judge(Figures.of(pairs), THRESHOLDS)
    assert not passed and reason in why, why


def test_thresholds_travel_on_the_version_as_tags():
    from training.config import load_config

    thresholds = Thresholds.from_config(load_config({"shadow_share": 0.5, "shadow_minutes": 2}, environ={}))
    assert thresholds.as_tags()["shadow_share"] == "0.5"
    assert Thresholds.from_tags(thresholds.as_tags()) == thresholds
    with pytest.raises(ValueError, match="lacks the tags"):
        Thresholds.from_tags({"shadow_share": "0.5"})


def test_the_first_pairs_of_a_window_warm_the_challenger_up_and_are_not_judged(tmp_path):
    log = tmp_path / "shadow.log"
    window = Window.starting_now(log, warmup=2)
    log.write_text("".join(_line("champion", str(i)) + _line("challenger", str(i), time=str(t))
                           for i, t in enumerate(["0.900", "0.800", "0.030"])))
    assert window.read() == 1 and window.pairs[0][1].seconds == 0.03
