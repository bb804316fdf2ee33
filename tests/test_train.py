"""The training loop: exact resume, time budget, checkpoints, and a real-corpus run."""
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from seq2seq import checkpoint
from seq2seq.config import Config, load_preset
from seq2seq.device import native_bf16
from seq2seq.errors import Interrupted
from seq2seq.training import timing_trainer, train
from seq2seq.training.schedule import BUDGET_MARGIN, plan_total_steps
from seq2seq.training.tasks import TASKS
from conftest import SAMPLE_DIR, run_cli, shared_corpus


@pytest.mark.parametrize("preset,kind,extra", [
    ("tiny-en-fr", "translator", ["model.dropout=0.2", "data.sample_alpha=0.1", "train.teacher_forcing=0.8"]),
    ("tiny-charlm", "charlm", ["model.dropout=0.2"]),
    ("tiny-classifier", "classifier", ["model.dropout=0.3", "train.ema_decay=0.9"]),
])
def test_resumed_run_continues_exactly(tmp_path, monkeypatch, preset, kind, extra):
    cfg = load_preset(preset, kind, ["train.max_steps=12", "train.eval_every=4", "train.max_epochs=50",
                                     "train.lr_schedule=cosine", *extra])
    train(cfg, SAMPLE_DIR, tmp_path / "straight")

    # Ctrl-C (a real SIGINT) in the 10th training step (the char LM has 6 windows an epoch:
    # mid-epoch, with a carried hidden state): the step finishes, the state is saved; then --resume
    original, calls = TASKS[kind].loss, []

    def interrupted(self, batch, *args, **kwargs):
        if self.model.training:
            calls.append(1)
            if len(calls) == 10:
                os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch, *args, **kwargs)

    monkeypatch.setattr(TASKS[kind], "loss", interrupted)
    with pytest.raises(Interrupted, match="SIGINT: state saved at step 10"):
        train(cfg, SAMPLE_DIR, tmp_path / "resumed")
    monkeypatch.undo()
    assert json.loads(torch.load(tmp_path / "resumed" / checkpoint.STATE, weights_only=True)["progress"])["step"] == 10
    train(cfg, None, tmp_path / "resumed", resume=True)

    for weights in (checkpoint.LAST, checkpoint.BEST):  # the best model: the weight average, where kept
        straight = load_file(tmp_path / "straight" / weights)
        resumed = load_file(tmp_path / "resumed" / weights)
        assert straight.keys() == resumed.keys()
        for name in straight:
            assert torch.equal(straight[name], resumed[name]), (weights, name)
    states = [torch.load(tmp_path / run / checkpoint.STATE, weights_only=True) for run in ("straight", "resumed")]
    assert ("weight_average" in states[0]) == ("train.ema_decay=0.9" in extra) == ("weight_average" in states[1])
    if "weight_average" in states[0]:
        averages = [state["weight_average"] for state in states]
        assert averages[0]["updates"] == averages[1]["updates"] == 12
        assert all(torch.equal(a, b) for a, b in zip(averages[0]["average"], averages[1]["average"]))
    log = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["type"] == "eval"] == [4, 8, 12]


def test_time_budget_run_plans_its_steps_and_keeps_the_best(tmp_path):
    out = tmp_path / "budget"
    result = run_cli("train", "translator", "--preset", "tiny-en-fr", "--data-dir", SAMPLE_DIR, "--output", out,
                     "--time-budget", "0.1", "--set", "train.max_epochs=100000")
    assert result.returncode == 0, result.stderr
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    plan = [r for r in log if r["type"] == "plan"]
    assert len(plan) == 1 and plan[0]["total_steps"] > plan[0]["step"] > 0
    assert "steps planned for the budget" in result.stderr or "time budget of 0.1 min used" in result.stderr
    for name in ("config.json", "model.safetensors", "spm.model", "metrics.json", "resume.safetensors",
                 "train_state.pt", "metrics.jsonl"):
        assert (out / name).is_file(), name
    state = torch.load(out / "train_state.pt", weights_only=True)  # no pickle-executed code
    replans = [r for r in log if r["type"] == "replan"]  # on a machine whose speed drifted
    assert json.loads(state["progress"])["total_steps"] == (replans or plan)[-1]["total_steps"]
    cfg, model, _ = checkpoint.load(out)
    assert cfg.kind == "translator" and not model.training


def test_plan_fills_what_is_left_of_the_budget():
    # 100 s budget, 10 s used in 30 steps, 0.25 s a step, 2 s an evaluation every 40 steps (and a last one)
    total = plan_total_steps(100, 10, 30, 0.25, 2.0, 40, ceiling=10_000)
    more = total - 30
    assert abs(more * 0.25 + (more / 40 + 1) * 2.0 - (100 * (1 - BUDGET_MARGIN) - 10)) < 0.3
    assert plan_total_steps(100, 10, 30, 0.25, 2.0, 40, ceiling=200) == 200  # max_epochs is a ceiling
    assert plan_total_steps(100, 120, 30, 0.25, 2.0, 40, ceiling=10_000) == 30  # already over: stop now


class FakeClock:
    """Wall clock that moves only when a training step runs: `step_s` a step, or what `slow` says."""

    def __init__(self, step_s: float, slow=lambda step: None):
        self.now, self.step_s, self.slow, self.steps = 0.0, step_s, slow, 0

    def __call__(self) -> float:
        return self.now

    def install(self, monkeypatch, kind: str) -> None:
        """Training steps of `kind` move this clock (pass it to `train` as its clock)."""
        original = TASKS[kind].loss

        def timed(task, batch, *args, **kwargs):
            if task.model.training:
                self.steps += 1
                self.now += self.slow(self.steps) or self.step_s
            return original(task, batch, *args, **kwargs)

        monkeypatch.setattr(TASKS[kind], "loss", timed)


def budget_run(tmp_path, monkeypatch, clock: FakeClock, minutes: float, *overrides):
    cfg = load_preset("tiny-charlm", "charlm", ["train.lr_schedule=cosine", "train.warmup_steps=10",
                                                "train.eval_every=20", "train.log_every=1", *overrides])
    clock.install(monkeypatch, "charlm")
    train(cfg, SAMPLE_DIR, tmp_path, time_budget=minutes, clock=clock)
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return cfg, log


def test_budget_run_ends_annealed_when_the_budget_is_spent(tmp_path, monkeypatch):
    clock = FakeClock(0.5)
    cfg, log = budget_run(tmp_path, monkeypatch, clock, 1.0, "train.max_epochs=100000")
    (plan,) = [r for r in log if r["type"] == "plan"]
    # speed measured from 5% of the budget (3 s: step 6) to 20% (12 s: step 24)
    assert plan["step"] == 24 and plan["step_s"] == 0.5
    # 60 s less the margin, of which 12 s went into the first 24 steps: 0.5 s a step from then on
    assert plan["total_steps"] == 24 + int((60 * (1 - BUDGET_MARGIN) - 12) / 0.5)
    steps = [r for r in log if r["type"] == "train"]
    assert steps[-1]["step"] == plan["total_steps"] == clock.steps
    assert clock.now <= 60
    assert steps[-1]["lr"] == pytest.approx(cfg.train.lr * cfg.train.min_lr_ratio, rel=1e-3)  # annealed
    # warmup, then the peak until the plan, then the cosine from the plan's step
    assert [r["lr"] for r in steps[9:24]] == [pytest.approx(cfg.train.lr)] * 15
    assert all(a > b for a, b in zip([r["lr"] for r in steps[24:]], [r["lr"] for r in steps[25:]]))
    assert [r for r in log if r["type"] == "eval"][-1]["step"] == plan["total_steps"]  # a final evaluation


def test_budget_run_is_not_cut_short_by_max_epochs(tmp_path, monkeypatch):
    """The budget owns the run's end: a max_epochs ceiling below what the budget holds does not
    shorten the plan (it did: a 60-minute run planned 30 epochs and ended at 39 minutes)."""
    clock = FakeClock(0.5)
    cfg, log = budget_run(tmp_path, monkeypatch, clock, 1.0, "train.max_epochs=2")
    (plan,) = [r for r in log if r["type"] == "plan"]
    assert plan["total_steps"] == 24 + int((60 * (1 - BUDGET_MARGIN) - 12) / 0.5) == clock.steps
    steps = [r for r in log if r["type"] == "train"]
    assert steps[-1]["epoch"] > 2
    assert steps[-1]["lr"] == pytest.approx(cfg.train.lr * cfg.train.min_lr_ratio, rel=1e-3)


def test_budget_run_whose_dev_score_stalls_anneals_early_instead_of_stopping(tmp_path, monkeypatch):
    """Patience in a budget run starts a short anneal from the learning rate reached (10% of the
    plan, at least one evaluation interval) instead of stopping with it still high; the run then
    ends annealed at the new last step.
    Without a budget, patience stops the run as before."""
    scores = iter(range(100, 0, -1))  # every evaluation worse than the one before
    monkeypatch.setattr(TASKS["charlm"], "validate", lambda task: {"valid_nats_per_char": 1.0, "score": next(scores)})
    clock = FakeClock(0.5)
    cfg, log = budget_run(tmp_path, monkeypatch, clock, 1.0, "train.max_epochs=100000", "train.patience=2")
    (plan,) = [r for r in log if r["type"] == "plan"]
    (early,) = [r for r in log if r["type"] == "replan" and r.get("reason") == "patience"]
    assert early["was"] == plan["total_steps"] and early["total_steps"] == early["step"] + max(20, round(0.1 * plan["total_steps"]))
    steps = [r for r in log if r["type"] == "train"]
    assert steps[-1]["step"] == early["total_steps"] == clock.steps
    at_early = next(r["lr"] for r in steps if r["step"] == early["step"])
    assert steps[-1]["lr"] == pytest.approx(cfg.train.lr * cfg.train.min_lr_ratio, rel=1e-3)
    after = [r["lr"] for r in steps if r["step"] > early["step"]]
    assert after[0] <= at_early and all(a >= b for a, b in zip(after, after[1:]))  # no jump back to the peak

    monkeypatch.undo()
    scores = iter(range(100, 0, -1))
    monkeypatch.setattr(TASKS["charlm"], "validate", lambda task: {"valid_nats_per_char": 1.0, "score": next(scores)})
    cfg = load_preset("tiny-charlm", "charlm", ["train.eval_every=20", "train.patience=2", "train.max_epochs=100000"])
    best = train(cfg, SAMPLE_DIR, tmp_path / "no-budget")
    log = [json.loads(line) for line in (tmp_path / "no-budget" / "metrics.jsonl").read_text().splitlines()]
    assert best["step"] == 20 and [r for r in log if r["type"] == "eval"][-1]["step"] == 60


def test_budget_run_that_overruns_stops_on_time_and_keeps_its_model(tmp_path, monkeypatch):
    clock = FakeClock(0.5, slow=lambda step: 3.0 if step > 40 else None)  # 6x slower after the plan
    _, log = budget_run(tmp_path, monkeypatch, clock, 1.0, "train.max_epochs=100000")
    (plan,) = [r for r in log if r["type"] == "plan"]
    assert clock.steps < plan["total_steps"]
    assert clock.now <= 60 + 3.0
    assert (tmp_path / "model.safetensors").is_file()
    assert [r for r in log if r["type"] == "eval"][-1]["step"] == clock.steps


def test_budget_run_that_slows_down_replans_and_still_ends_annealed(tmp_path, monkeypatch):
    clock = FakeClock(0.5, slow=lambda step: 0.75 if step > 40 else None)  # 1.5x slower after step 40
    cfg, log = budget_run(tmp_path, monkeypatch, clock, 1.0, "train.max_epochs=100000")
    (plan,) = [r for r in log if r["type"] == "plan"]
    assert plan["total_steps"] == 24 + int((60 * (1 - BUDGET_MARGIN) - 12) / 0.5)  # 116, at 0.5 s a step
    # the evaluation at step 60 sees 0.75 s a step: 35 s used, 23.2 s left for 30 more steps
    (replan,) = [r for r in log if r["type"] == "replan"]
    assert (replan["step"], replan["total_steps"], replan["was"], replan["step_s"]) == (60, 90, 116, 0.75)
    steps = [r for r in log if r["type"] == "train"]
    assert steps[-1]["step"] == clock.steps == 90 and clock.now <= 60
    assert steps[-1]["lr"] == pytest.approx(cfg.train.lr * cfg.train.min_lr_ratio, rel=1e-3)  # annealed, not cut
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert json.loads(state["progress"])["total_steps"] == 90  # what a resume follows


def test_budget_run_slowed_for_a_while_takes_its_steps_back(tmp_path, monkeypatch):
    clock = FakeClock(0.5, slow=lambda step: 0.75 if 40 < step <= 60 else None)  # one slow window, then as before
    cfg, log = budget_run(tmp_path, monkeypatch, clock, 1.0, "train.max_epochs=100000")
    (plan,) = [r for r in log if r["type"] == "plan"]
    shorter, longer = [r for r in log if r["type"] == "replan"]
    assert (shorter["step"], shorter["total_steps"], shorter["was"]) == (60, 90, plan["total_steps"])
    # at step 80, 45 s used and 0.5 s a step again: 90 steps would leave over twice the margin
    # unused, so the plan fills what is left less the margin: 13.2 s, 26 more steps
    assert (longer["step"], longer["total_steps"], longer["was"], longer["step_s"]) == (80, 106, 90, 0.5)
    steps = [r for r in log if r["type"] == "train"]
    assert steps[-1]["step"] == clock.steps == 106 and 60 * (1 - 2 * BUDGET_MARGIN) <= clock.now <= 60
    assert steps[-1]["lr"] == pytest.approx(cfg.train.lr * cfg.train.min_lr_ratio, rel=1e-3)


def test_budget_run_that_speeds_up_lengthens_its_plan_to_fill_the_budget(tmp_path, monkeypatch):
    clock = FakeClock(0.5, slow=lambda step: 0.25 if step > 40 else None)  # twice as fast after the plan
    cfg, log = budget_run(tmp_path, monkeypatch, clock, 1.0, "train.max_epochs=100000")
    (plan,) = [r for r in log if r["type"] == "plan"]
    # the evaluation at step 60 sees 0.25 s a step: 25 s used, so the plan fills what is left
    longer = [r for r in log if r["type"] == "replan"][0]
    assert (longer["step"], longer["was"], longer["step_s"]) == (60, plan["total_steps"], 0.25)
    assert longer["total_steps"] == 60 + int((60 * (1 - BUDGET_MARGIN) - 25) / 0.25)
    steps = [r for r in log if r["type"] == "train"]
    assert steps[-1]["step"] == clock.steps > plan["total_steps"]
    assert 60 * (1 - 2 * BUDGET_MARGIN) <= clock.now <= 60
    assert steps[-1]["lr"] == pytest.approx(cfg.train.lr * cfg.train.min_lr_ratio, rel=1e-3)


def test_budget_run_slowed_within_the_margin_keeps_its_plan(tmp_path, monkeypatch):
    clock = FakeClock(0.5, slow=lambda step: 0.51 if step > 40 else None)  # 2% slower: the 3% margin absorbs it
    _, log = budget_run(tmp_path, monkeypatch, clock, 1.0, "train.max_epochs=100000")
    (plan,) = [r for r in log if r["type"] == "plan"]
    assert not [r for r in log if r["type"] == "replan"]
    assert clock.steps == plan["total_steps"] and clock.now <= 60


@pytest.mark.parametrize("resumed_step_s, resumed_budget", [(5.0, 100.0), (0.25, 1.0)], ids=["slower", "faster"])
def test_budget_run_resumed_after_its_plan_continues_exactly(tmp_path, monkeypatch, resumed_step_s, resumed_budget):
    straight_clock = FakeClock(0.5)
    budget_run(tmp_path / "straight", monkeypatch, straight_clock, 1.0, "train.max_epochs=100000")
    monkeypatch.undo()

    clock = FakeClock(0.5, slow=lambda step: (_ for _ in ()).throw(KeyboardInterrupt) if step == 70 else None)
    with pytest.raises(KeyboardInterrupt):
        budget_run(tmp_path / "resumed", monkeypatch, clock, 1.0, "train.max_epochs=100000")
    monkeypatch.undo()
    cfg = Config.load(tmp_path / "resumed" / "config.json")
    # slower with more time, or faster: either way the plan holds (a resumed session never lengthens it)
    clock = FakeClock(resumed_step_s)
    clock.install(monkeypatch, "charlm")
    train(cfg, None, tmp_path / "resumed", time_budget=resumed_budget, resume=True, clock=clock)
    straight = load_file(tmp_path / "straight" / checkpoint.LAST)
    resumed = load_file(tmp_path / "resumed" / checkpoint.LAST)
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


@pytest.mark.every_cpu
def test_short_end_to_end_run_on_multi30k(tmp_path):
    """A slice of the real corpus: train briefly, translate, evaluate with sacreBLEU."""
    corpus = shared_corpus("multi30k-en-fr")
    for split, n in (("train", 3000), ("val", 100), ("test_2016_flickr", 100)):
        for lang in ("en", "fr"):
            lines = (corpus / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()[:n]
            (tmp_path / f"{split}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "m30k"
    result = run_cli("train", "translator", "--preset", "multi30k-en-fr", "--data-dir", tmp_path, "--output", out,
                     "--set", f"data.train='{tmp_path}/train'", "--set", f"data.dev='{tmp_path}/val'",
                     "--set", f"data.test='{tmp_path}/test_2016_flickr'", "--set", "data.vocab_size=1000",
                     "--set", "model.enc_layers=1", "--set", "model.dec_hidden=256", "--set", "train.max_epochs=2")
    assert result.returncode == 0, result.stderr
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in log if r["type"] == "eval"]
    assert len(evals) == 2 and evals[1]["dev_loss"] < evals[0]["dev_loss"]
    assert all(r["grad_norm"] > 0 for r in log if r["type"] == "train")
    scores = run_cli("evaluate", "-m", out, "--src", tmp_path / "test_2016_flickr.en", "--ref",
                     tmp_path / "test_2016_flickr.fr", "--beam", "3", "--json")
    assert scores.returncode == 0, scores.stderr
    scores = json.loads(scores.stdout)
    assert scores["sentences"] == 100 and scores["chrf"] > 5
    test = json.loads((out / "metrics.json").read_text())["test"]  # the preset's test split, scored at the end
    assert test["test_sentences"] == 100 and test["test_beam"] == 5 and test["test_chrf"] > 5
    translated = run_cli("translate", "-m", out, "A man is riding a bicycle down the street.")
    assert translated.returncode == 0 and translated.stdout.count("\n") == 1
    assert (out / "shortlist.safetensors").is_file()  # the output layer's vocabulary shortlist, with the model
    precision = next(r for r in log if r["type"] == "precision")  # the preset's bf16 where native, else fp32
    assert precision["train"] == ("bf16" if native_bf16() else "fp32")


def test_weight_decay_is_decoupled_from_the_gradient_moments(tmp_path):
    """A weight with no gradient shrinks by lr * weight_decay a step (AdamW), not by a step of size
    lr that Adam's moments make of an L2 gradient, whatever the weight's scale."""
    cfg = load_preset("tiny-charlm", "charlm", ["train.weight_decay=0.1", "train.lr=0.01", "train.warmup_steps=0",
                                                "train.lr_schedule=constant"])
    trainer = timing_trainer(cfg, SAMPLE_DIR)
    weight = trainer.model.embed.weight
    before = weight.detach().clone()
    for p in trainer.model.parameters():
        p.grad = torch.zeros_like(p)
    trainer.optimizer.step()
    torch.testing.assert_close(weight.detach(), before * (1 - 0.01 * 0.1))
    assert not (tmp_path / "run").exists()  # a trainer that only steps writes no run folder


def test_weight_average_follows_its_warmed_up_decay_and_swaps_back():
    from seq2seq.training.averaging import WeightAverage

    model = torch.nn.Linear(1, 1, bias=False)
    frozen = torch.nn.Linear(1, 1, bias=False).requires_grad_(False)
    both = torch.nn.Sequential(model, frozen)
    with torch.no_grad():
        model.weight.fill_(0.0)
    average = WeightAverage(both, decay=0.5)
    assert len(average.average) == 1  # the frozen layer is not averaged
    for value in (1.0, 2.0, 3.0):
        with torch.no_grad():
            model.weight.fill_(value)
        average.update()
    # decays min(0.5, (1 + n) / (10 + n)): 2/11, 3/12, 4/13
    expected = 0.0
    for n, value in enumerate((1.0, 2.0, 3.0), start=1):
        d = min(0.5, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * value
    assert abs(expected - 2.6014) < 1e-4  # 9/11 -> 1.7045 -> 2.6014, by hand
    with average.swapped_in():
        assert float(model.weight.detach()) == pytest.approx(expected)
    assert float(model.weight.detach()) == 3.0
    restored = WeightAverage(both, decay=0.5)
    restored.load_state(average.state())
    assert restored.updates == 3 and float(restored.average[0]) == pytest.approx(expected)
