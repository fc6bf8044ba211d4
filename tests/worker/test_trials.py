"""The trial record, the Pareto front and the automatic choice, shared by worker and controller."""

from __future__ import annotations

from hctl_worker.events import ParetoEvent, TrialEvent, decode, encode
from hctl_worker.trials import Trial, best_within, choose, find, pareto_front


def trial(number: int, refusals: int | None, kl: float) -> Trial:
    return Trial(number=number, params={}, kl=kl, refusals=refusals, total_bad=10, seconds=1)


TRIALS = [
    trial(1, 10, 0.0001),
    trial(2, 3, 0.02),
    trial(3, 3, 0.05),  # dominated by 2
    trial(4, 0, 0.3),
    trial(5, 5, 0.01),
    trial(6, None, 0.0),  # refusals skipped: never on the front
    trial(7, 6, 0.02),  # dominated by 5
    trial(8, 3, 0.02),  # the same scores as 2, later: 2 stands for both
    trial(9, 0, 0.9),  # dominated by 4
]


def test_pareto_front_fewest_refusals_first_and_dominated_trials_dropped() -> None:
    front = pareto_front(TRIALS)
    assert [item.number for item in front] == [4, 2, 5, 1]
    refusals = [item.refusals for item in front]
    kls = [item.kl for item in front]
    assert refusals == sorted(refusals) and kls == sorted(kls, reverse=True)
    assert pareto_front([]) == []
    assert pareto_front([trial(1, None, 0.1)]) == []


def test_the_front_does_not_depend_on_the_order_trials_come_in() -> None:
    assert pareto_front(reversed(TRIALS)) == pareto_front(TRIALS)


def test_the_automatic_choice_takes_the_fewest_refusals_under_the_kl_limit() -> None:
    front = pareto_front(TRIALS)
    assert choose(front).number == 4  # KL 0.3 is under the default limit of 0.5
    assert choose(front, kl_limit=0.1).number == 2
    assert choose(front, kl_limit=0.015).number == 5
    # Nothing under the limit: the least damaging (lowest KL) trial.
    assert choose(front, kl_limit=0.00001).number == 1
    assert choose([]) is None


def test_best_within_looks_at_every_scored_trial() -> None:
    assert best_within(TRIALS, kl_limit=0.03).number == 2  # 8 ties with it, and came later
    assert best_within(TRIALS, kl_limit=0.00001) is None


def test_find_a_trial_by_its_number() -> None:
    assert find(TRIALS, 7).kl == 0.02
    assert find(TRIALS, 99) is None


def test_events_carry_the_record_and_keep_the_engine_details_off_the_wire() -> None:
    record = Trial(
        number=3, params={"a": 1.0}, kl=0.5, refusals=None, total_bad=4, seconds=1.23456,
        ablation={"direction_index": 2.0},
    )  # fmt: skip
    event = TrialEvent.of(record, n_trials=10)
    assert event.refusal_skipped and event.seconds == 1.235 and event.n_trials == 10
    line = encode(event)
    assert "ablation" not in line and "direction_index" not in line
    decoded = decode(line)
    assert isinstance(decoded, TrialEvent) and isinstance(decoded, Trial)
    assert decoded.model_dump(exclude={"ts"}) == event.model_dump(exclude={"ts"})
    # The front of events is made of the events themselves.
    events = [TrialEvent.of(item, n_trials=9) for item in TRIALS]
    assert all(isinstance(item, TrialEvent) for item in pareto_front(events))
    pareto = decode(encode(ParetoEvent(trials=pareto_front(TRIALS))))
    assert [item.number for item in pareto.trials] == [4, 2, 5, 1]


def test_an_event_from_before_named_scores_reads_as_its_two_objectives() -> None:
    line = (
        '{"v": 1, "ts": 1.0, "seq": 3, "type": "trial", "number": 4, "n_trials": 9, "params": {},'
        ' "kl": 0.25, "refusals": 7, "total_bad": 50, "refusal_skipped": false, "seconds": 2.0}'
    )
    event = decode(line)
    assert isinstance(event, TrialEvent)
    assert (event.refusals, event.total_bad, event.kl) == (7, 50, 0.25)
    assert event.scores["KeywordRate"].display() == "7/50"
    assert event.scores["KLDivergence"].direction == "minimize"
    assert event.objectives() == (7.0, 0.25)
    # Written again, it carries its scores by name and the derived headline numbers.
    again = decode(encode(event))
    assert again.scores == event.scores and again.kl == 0.25 and again.refusals == 7


def test_scores_display_and_describe_a_trial() -> None:
    from hctl_worker.trials import Score, describe_scores

    guarded = Trial(
        number=1,
        scores={
            "RefusalClassifier": Score(value=2, of=40, direction="minimize", role="refusals"),
            "MultiTokenKL": Score(value=0.01234, direction="minimize", role="damage"),
            "HarmlessRefusals": Score(value=9, of=40, role="harmless_refusals", limit=4.0),
            "Skipped": Score(value=None),
            "Broken": Score(value=float("nan")),
        },
    )
    assert describe_scores(guarded) == (
        "RefusalClassifier 2/40, MultiTokenKL 0.0123, HarmlessRefusals 9/40 (over its limit 4), "
        "Skipped —, Broken 1e+06"
    )
    assert not guarded.acceptable and guarded.refusals == 2 and guarded.kl == 0.01234
    assert pareto_front([guarded]) == [] and choose([guarded]) is None
