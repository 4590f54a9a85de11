"""The volunteer's sans-IO machine, driven event by event without a network, disk or trainer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from crowdtrain import codec
from crowdtrain.adversary import Attacker
from crowdtrain.client import events as ve
from crowdtrain.client import machine as vm
from crowdtrain.client.work import overlap_start
from crowdtrain.config import RunConfig
from crowdtrain.robust.usefulness import Score
from crowdtrain.train import Contribution
from crowdtrain_testing import tiny_config

SHAPES = {"w": (4, 8), "b": (8,)}


@dataclass(frozen=True)
class Order:
    """A work order as the protocol gives it (the fields the machine reads)."""

    round: int = 0
    base_version: int = 0
    shard_ids: tuple[str, ...] = ("a" * 64,)
    seed: int = 1
    step_offset: int = 0
    budget: str = "steps"
    max_steps: int = 4
    max_seconds: float = 10.0


@dataclass(frozen=True)
class Prior:
    round: int = 0
    base_version: int = 0
    shard_ids: tuple[str, ...] = ("a" * 64,)
    seed: int = 1
    step_offset: int = 0
    first_batch: int = 2
    steps: int = 2


@dataclass(frozen=True)
class CheckOrder:
    check_id: str = "c1"
    target: str = "peer-b"
    round: int = 1
    base_version: int = 1
    shard_ids: tuple[str, ...] = ("b" * 64,)
    seed: int = 1
    step_offset: int = 4
    steps: int = 4
    prior: Prior | None = None


@dataclass(frozen=True)
class ScoreCheck:
    check_id: str = "s1"
    target: str = "peer-b"
    round: int = 1
    base_version: int = 1
    shard_ids: tuple[str, ...] = ("b" * 64,)
    seed: int = 1
    step_offset: int = 4
    assigned_batch: int = 2
    heldout_batch: int = 7


SCORE = Score(3.0, 2.5, 3.1, 3.05, 0.01)


def config(codec_name: str = "int8", **inner: object) -> RunConfig:
    return tiny_config(Path("corpus"), Path("data"), inner=dict(inner), codec={"name": codec_name})


def params(value: float) -> dict[str, torch.Tensor]:
    return {k: torch.full(s, value) for k, s in SHAPES.items()}


def result(steps: int, value: float = 0.25, seconds: float = 1.0) -> Contribution:
    return Contribution(
        delta=params(value),
        samples=8 * steps,
        tokens=256 * steps,
        steps=steps,
        loss_first=3.0,
        loss_last=2.0,
        loss_mean=2.5,
        seconds=seconds,
    )


def machine(cfg: RunConfig | None = None, attacker: Attacker | None = None) -> vm.VolunteerMachine:
    m = vm.VolunteerMachine("peer-a", cfg or config(), SHAPES, attacker=attacker)
    assert m.handle(ve.Start()) == [ve.AskForWork()]
    return m


def one(decisions: list[ve.Decision]) -> ve.Decision:
    (d,) = decisions
    return d


def test_a_work_order_without_overlap_trains_uploads_and_asks_again() -> None:
    m = machine(config(overlap=False))
    order = Order()
    assert one(m.handle(ve.GotWork(order))) == ve.Fetch(order)
    train = one(m.handle(ve.InputsReady(params(1.0))))
    assert isinstance(train, ve.Train) and m.state is vm.State.TRAINING
    seg = train.segment
    assert (seg.first_batch, seg.step_offset, seg.max_steps, seg.max_seconds) == (0, 0, 4, None)
    assert seg.start is None and seg.peer == "peer-a" and not seg.poisoned
    upload = one(m.handle(ve.Trained(result(4))))
    assert isinstance(upload, ve.Upload) and upload.overlap is None
    assert upload.meta()["overlap_round"] == -1 and upload.claim.steps == 4
    sent = codec.decode(upload.payload, SHAPES)
    assert all(torch.allclose(sent[k], torch.full(s, 0.25), atol=1e-2) for k, s in SHAPES.items())
    assert m.handle(ve.Uploaded(True)) == [ve.AskForWork()]


def test_a_seconds_budget_becomes_a_seconds_segment() -> None:
    m = machine(config(overlap=False))
    m.handle(ve.GotWork(Order(budget="seconds", max_seconds=7.5)))
    train = one(m.handle(ve.InputsReady(params(1.0))))
    assert isinstance(train, ve.Train)
    assert (train.segment.max_steps, train.segment.max_seconds) == (None, 7.5)


def overlapped_round(m: vm.VolunteerMachine) -> ve.Speculate:
    """Round 0 trained 4 steps and uploaded; returns the overlapped training it started."""
    m.handle(ve.GotWork(Order()))
    m.handle(ve.InputsReady(params(1.0)))
    speculate, upload = m.handle(ve.Trained(result(4)))
    assert isinstance(speculate, ve.Speculate) and isinstance(upload, ve.Upload)
    # it starts from θ_0 − decode(payload): what anyone can recompute, not the private end
    expected = overlap_start(params(1.0), codec.decode(upload.payload, SHAPES))
    seg = speculate.segment
    assert all(torch.equal(seg.base[k], expected[k]) for k in SHAPES) and seg.start is None
    assert (seg.first_batch, seg.step_offset, seg.max_steps) == (4, 4, 4)
    assert m.handle(ve.Uploaded(True)) == [ve.AskForWork()]
    return speculate


def test_overlapped_progress_is_rebased_onto_the_next_base() -> None:
    m = machine()
    overlapped_round(m)
    m.handle(ve.GotWork(Order(round=1, base_version=1, step_offset=4)))
    assert m.handle(ve.InputsReady(params(2.0))) == [ve.StopSpeculation()]
    train = one(m.handle(ve.SpeculationEnded(result(3, value=0.5))))
    assert isinstance(train, ve.Train)
    seg = train.segment
    assert all(torch.equal(seg.start[k], torch.full(s, 1.5)) for k, s in SHAPES.items())  # type: ignore[index]
    assert (seg.first_batch, seg.step_offset, seg.max_steps) == (0, 4, 1)
    speculate, upload = m.handle(ve.Trained(result(1, value=0.75)))
    assert isinstance(speculate, ve.Speculate) and isinstance(upload, ve.Upload)
    assert upload.overlap == ve.Overlap(3, 0, 4) and upload.claim.steps == 4
    assert upload.claim.samples == 8 * 4
    assert speculate.segment.first_batch == 1  # after the one fresh step of round 1


def test_overlapped_progress_that_fills_the_budget_is_the_contribution() -> None:
    m = machine()
    overlapped_round(m)
    m.handle(ve.GotWork(Order(round=1, base_version=1, step_offset=4)))
    m.handle(ve.InputsReady(params(2.0)))
    speculate, upload = m.handle(ve.SpeculationEnded(result(4, value=0.5)))
    assert isinstance(upload, ve.Upload) and isinstance(speculate, ve.Speculate)
    assert upload.overlap == ve.Overlap(4, 0, 4) and speculate.segment.first_batch == 0
    assert m.state is vm.State.UPLOADING


def test_a_speculation_without_a_step_is_no_overlap() -> None:
    m = machine()
    overlapped_round(m)
    m.handle(ve.GotWork(Order(round=1, base_version=1, step_offset=4)))
    m.handle(ve.InputsReady(params(2.0)))
    train = one(m.handle(ve.SpeculationEnded(None)))
    assert isinstance(train, ve.Train) and train.segment.start is None
    _, upload = m.handle(ve.Trained(result(4)))
    assert isinstance(upload, ve.Upload) and upload.overlap is None


def test_overlap_that_continues_a_refused_upload_is_dropped() -> None:
    """The coordinator refuses overlapped steps it cannot replay; the prior upload was
    refused, so the volunteer starts the next order afresh instead."""
    m = machine()
    m.handle(ve.GotWork(Order()))
    m.handle(ve.InputsReady(params(1.0)))
    speculate, _ = m.handle(ve.Trained(result(4)))
    assert isinstance(speculate, ve.Speculate)
    assert m.handle(ve.Uploaded(False)) == [ve.AskForWork()]
    starts_afresh(m, Order(round=1, base_version=1, step_offset=4))


def test_overlap_is_dropped_when_the_next_order_is_not_for_the_next_round() -> None:
    """A volunteer that sat out round 1 (a check, a wait) gets round 2's order: its overlap
    continued round 0's upload, which the coordinator replays only into round 1."""
    m = machine()
    overlapped_round(m)
    starts_afresh(m, Order(round=2, base_version=2, step_offset=8))


def starts_afresh(m: vm.VolunteerMachine, order: Order) -> None:
    """M, training ahead, gets ORDER: it drops the overlapped steps and trains the whole
    budget from the new base, declaring no overlap."""
    m.handle(ve.GotWork(order))
    assert m.handle(ve.InputsReady(params(2.0))) == [ve.StopSpeculation()]
    train = one(m.handle(ve.SpeculationEnded(result(3, value=0.5))))
    assert isinstance(train, ve.Train) and train.segment.start is None
    assert train.segment.max_steps == 4
    _, upload = m.handle(ve.Trained(result(4)))
    assert isinstance(upload, ve.Upload) and upload.overlap is None


def test_a_spot_check_pauses_overlapped_training_and_resumes_it() -> None:
    m = machine()
    overlapped_round(m)
    check = CheckOrder(prior=Prior())
    assert one(m.handle(ve.GotCheck(check))) == ve.Fetch(check)
    start = params(0.5)
    pause, replay = m.handle(ve.InputsReady(params(2.0), start))
    assert pause == ve.PauseSpeculation() and isinstance(replay, ve.Replay)
    assert replay.prior is start and replay.check is check
    upload = one(m.handle(ve.Trained(result(4))))
    assert isinstance(upload, ve.UploadReplay) and upload.result.steps == 4
    assert m.handle(ve.Uploaded(False)) == [ve.ResumeSpeculation(), ve.AskForWork()]
    # the overlapped training is still the machine's: the next order stops it
    m.handle(ve.GotWork(Order(round=1, base_version=1)))
    assert m.handle(ve.InputsReady(params(2.0))) == [ve.StopSpeculation()]


def test_a_score_order_scores_the_fetched_contribution_and_submits_the_losses() -> None:
    m = machine()
    check = ScoreCheck()
    assert m.handle(ve.GotScore(check)) == [ve.Fetch(check)]
    with pytest.raises(vm.MachineError, match="scored contribution"):
        m.handle(ve.InputsReady(params(1.0)))  # a driver that forgot the scored Δ
    m = machine()
    m.handle(ve.GotScore(check))
    evaluate = one(m.handle(ve.InputsReady(params(1.0), target=params(0.1))))
    assert isinstance(evaluate, ve.Evaluate) and evaluate.check is check
    assert torch.equal(evaluate.delta["w"], params(0.1)["w"])
    assert m.handle(ve.Evaluated(SCORE)) == [ve.UploadScore(check, SCORE)]
    assert m.handle(ve.Uploaded(True)) == [ve.AskForWork()]
    assert m.scoring is None


def test_a_score_order_pauses_overlapped_training_and_resumes_it() -> None:
    m = machine()
    m.handle(ve.GotWork(Order()))
    m.handle(ve.InputsReady(params(1.0)))
    decisions = m.handle(ve.Trained(result(4)))
    assert any(isinstance(d, ve.Speculate) for d in decisions)
    m.handle(ve.Uploaded(True))
    m.handle(ve.GotScore(ScoreCheck()))
    pause, evaluate = m.handle(ve.InputsReady(params(1.0), target=params(0.1)))
    assert pause == ve.PauseSpeculation() and isinstance(evaluate, ve.Evaluate)
    m.handle(ve.Evaluated(SCORE))
    assert m.handle(ve.Uploaded(False)) == [ve.ResumeSpeculation(), ve.AskForWork()]


def test_wait_finish_and_ban() -> None:
    m = machine()
    assert m.handle(ve.GotWait(1.5, "later")) == [ve.Wait(1.5, "later")]
    assert m.handle(ve.Woke()) == [ve.AskForWork()]
    assert m.handle(ve.GotFinished()) == [ve.Stop("the run is over")]
    with pytest.raises(vm.MachineError, match="state done cannot take GotWork"):
        m.handle(ve.GotWork(Order()))
    m = machine()
    m.handle(ve.GotWork(Order()))
    m.handle(ve.InputsReady(params(1.0)))
    assert m.handle(ve.GotBanned("bad")) == [ve.Stop("bad", banned=True)]


@pytest.mark.parametrize("state", list(vm.State))
def test_only_the_events_of_the_table_are_legal(state: vm.State) -> None:
    events: list[ve.Event] = [
        ve.Start(),
        ve.GotWork(Order()),
        ve.GotCheck(CheckOrder()),
        ve.GotScore(ScoreCheck()),
        ve.GotWait(1.0, "x"),
        ve.GotFinished(),
        ve.GotBanned("x"),
        ve.Woke(),
        ve.InputsReady(params(1.0)),
        ve.Trained(result(4)),
        ve.Evaluated(SCORE),
        ve.SpeculationEnded(None),
        ve.Uploaded(True),
    ]
    for event in events:
        m = vm.VolunteerMachine("peer-a", config(), SHAPES)
        m.state = state
        if (state, type(event)) not in vm.TRANSITIONS:
            with pytest.raises(vm.MachineError):
                m.handle(event)


def test_every_transition_of_a_run_is_in_the_table() -> None:
    """Drive a run with overlap and a check; each step lands in a state the table allows."""
    m = vm.VolunteerMachine("peer-a", config(), SHAPES)
    script: list[ve.Event] = [
        ve.Start(),
        ve.GotWait(0.5, "wait"),
        ve.Woke(),
        ve.GotWork(Order()),
        ve.InputsReady(params(1.0)),
        ve.Trained(result(4)),
        ve.Uploaded(True),
        ve.GotCheck(CheckOrder()),
        ve.InputsReady(params(1.0)),
        ve.Trained(result(4)),
        ve.Uploaded(True),
        ve.GotScore(ScoreCheck()),
        ve.InputsReady(params(1.0), target=params(0.1)),
        ve.Evaluated(SCORE),
        ve.Uploaded(True),
        ve.GotWork(Order(round=1, base_version=1)),
        ve.InputsReady(params(2.0)),
        ve.SpeculationEnded(result(2)),
        ve.Trained(result(2)),
        ve.Uploaded(True),
        ve.GotFinished(),
    ]
    seen = set()
    for event in script:
        before = m.state
        m.handle(event)
        assert m.state in vm.TRANSITIONS[(before, type(event))]
        seen.add((before, type(event)))
    assert m.state is vm.State.DONE
    unseen = set(vm.TRANSITIONS) - seen - {(s, ve.GotBanned) for s in vm.State}
    assert unseen == set()


def test_an_attacker_that_does_not_train_uploads_at_once() -> None:
    m = machine(attacker=Attacker("free_rider", "peer-a", seed=0))
    m.handle(ve.GotWork(Order()))
    upload = one(m.handle(ve.InputsReady(params(1.0))))
    assert isinstance(upload, ve.Upload) and upload.result is None
    assert upload.claim.steps == 4 and upload.overlap is None


def test_an_attacker_that_trains_poisons_its_batches_and_never_overlaps() -> None:
    m = machine(attacker=Attacker("sign_flip", "peer-a", seed=0))
    m.handle(ve.GotWork(Order()))
    train = one(m.handle(ve.InputsReady(params(1.0))))
    assert isinstance(train, ve.Train) and train.segment.poisoned
    upload = one(m.handle(ve.Trained(result(4))))  # no Speculate: attackers do not overlap
    assert isinstance(upload, ve.Upload)
    sent = codec.decode(upload.payload, SHAPES)
    assert all(torch.allclose(sent[k], torch.full(s, -0.25), atol=1e-2) for k, s in SHAPES.items())


def test_error_feedback_keeps_its_residual_across_a_reset() -> None:
    m = machine(config("topk2bit", overlap=False))
    assert m.residual == {}
    m.handle(ve.GotWork(Order()))
    m.handle(ve.InputsReady(params(1.0)))
    m.handle(ve.Trained(result(4, value=0.3)))
    kept = m.residual
    assert kept
    m.reset()
    assert m.state is vm.State.IDLE and m.residual is kept
    assert m.handle(ve.Start()) == [ve.AskForWork()]


def test_a_colluding_verifier_uploads_its_lie_as_its_replay() -> None:
    """The `collude` attack lies where an honest verifier replays: its upload (payload and
    result alike) is its accomplice's own submission, or its replay turned around."""
    from crowdtrain.adversary import RoundView

    mine = params(0.75)

    def view(round: int, own: dict[str, torch.Tensor]) -> RoundView:
        coalition = frozenset({"peer-a", "peer-b"})
        return RoundView(round, 5, 2, coalition=coalition, accomplices={"peer-b": mine})

    for target, expected in (("peer-b", mine), ("peer-c", params(-0.25))):
        m = vm.VolunteerMachine(
            "peer-a", config(), SHAPES, attacker=Attacker("collude", "peer-a", 0), view=view
        )
        m.handle(ve.Start())
        check = CheckOrder(target=target)
        m.handle(ve.GotCheck(check))
        m.handle(ve.InputsReady(params(2.0)))
        upload = one(m.handle(ve.Trained(result(4))))
        assert isinstance(upload, ve.UploadReplay)
        assert all(torch.equal(upload.result.delta[k], expected[k]) for k in SHAPES)
        decoded = codec.decode(upload.payload, SHAPES)
        assert all(torch.allclose(decoded[k], expected[k], atol=0.01) for k in SHAPES)
