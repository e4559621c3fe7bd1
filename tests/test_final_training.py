"""The fine-tune recipe and final training (issue 22), on a two-layer model: distillation pulls the student
toward its float teacher, the best-validation checkpoint is the one kept, no result is worse than the
policy's post-training model, final training starts from the fine-tuned weights it continues (checksum), and
a finalized export reloads to its recorded metric exactly."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from autoprune.compress import _Best, compress, train_further
from autoprune.policy import Policy
from autoprune.task import Task

SHAPE = (2, 6, 6)


def two_layers(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4)).eval()


@pytest.fixture(scope="module")
def task() -> Task:
    return teacher_task()


def teacher_task() -> Task:
    """A teacher's own labels as the task (importable as tests.test_final_training:teacher_task, so that
    worker processes rebuild it)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(384, *SHAPE, generator=generator)
    teacher = two_layers()
    with torch.no_grad():
        y = teacher(x).argmax(1)
    train = TensorDataset(x[:256], y[:256])
    val = TensorDataset(x[256:], y[256:])
    return Task.from_model(teacher, train=train, val=val, signal_steps=0, device="cpu")


def policy(**fields: object) -> Policy:
    return Policy(layers={"_default": {"w_bits": 2, "a_bits": 4}}, batch_size=32, calibration_batches=2, **fields)


def divergence(student: nn.Module, teacher: nn.Module, task: Task) -> float:
    """KL(teacher || student) of the softmax outputs over the validation split."""
    x = task.splits.val.tensors[0]
    with torch.no_grad():
        return float(nn.functional.kl_div(student(x).log_softmax(1), teacher(x).log_softmax(1), reduction="batchmean", log_target=True))


def test_distillation_lowers_the_students_divergence_from_its_teacher(task: Task) -> None:
    teacher = task.base(progress=False).model
    common = {"finetune_steps": 40, "finetune_lr": 0.05, "keep_best": False}
    plain = compress(teacher, policy(distill=False, **common), task=task)
    distilled = compress(teacher, policy(distill=True, distill_weight=1.0, **common), task=task)
    assert divergence(distilled.model, teacher, task) < 0.8 * divergence(plain.model, teacher, task)


def test_the_best_validation_checkpoint_is_the_one_kept() -> None:
    """_Best checks evaluations evenly from the first step in final form to the last, and restores the best."""
    values = iter([0.3, 0.9, 0.5, 0.4])
    model = nn.Linear(2, 1)
    best = _Best(SimpleNamespace(evaluate=lambda m, split: next(values)), evaluations=4, end=20)
    kept_weight = None
    for step in range(20):
        with torch.no_grad():
            model.weight.fill_(float(step))
        best.after_step(step, model, final_form=step >= 8)  # final form from step 8: checks at 10, 13, 16, 19
        if step == 13:
            kept_weight = model.weight.detach().clone()
    assert best.due == {10, 13, 16, 19}
    assert best.restore(model) == {"step": 13, "best_during_finetune": 0.9}
    assert torch.equal(model.weight, kept_weight)


def test_a_fine_tune_that_does_worse_keeps_the_post_training_model(task: Task) -> None:
    teacher = task.base(progress=False).model
    ptq = compress(teacher, policy(finetune_steps=0), task=task)
    ruined = compress(teacher, policy(finetune_steps=30, finetune_lr=10.0, distill=False), task=task)
    assert ruined.checkpoint["kept"] == "post_training"
    assert ruined.checkpoint["post_training"] >= ruined.checkpoint["finetuned"]
    assert ruined.checksum() == ptq.checksum()
    assert task.evaluate(ruined.model, "val") == task.evaluate(ptq.model, "val")


def test_final_training_continues_the_given_weights_and_never_returns_worse(task: Task) -> None:
    teacher = task.base(progress=False).model
    tuned = compress(teacher, policy(finetune_steps=20), task=task)
    start = task.evaluate(tuned.model, "val")
    before = tuned.checksum()
    further = train_further(tuned, teacher, task=task, steps=60)
    assert tuned.checksum() == before, "the fine-tuned model it started from is left as it was"
    assert further.checkpoint["kept"] in ("further", "start") and task.evaluate(further.model, "val") >= start
    # the layers it continued keep their structure and bits
    assert [m.weight.shape for m in further.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))] == [
        m.weight.shape for m in tuned.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    levels = (further.model[0].weight.detach().double() / further.weight_steps["0"]).abs()
    assert set(torch.round(levels * 2).unique().tolist()) <= {0.0, 1.0, 3.0}, "still on the 2-bit mid-rise grid (0, 0.5, 1.5 steps)"


def test_final_training_that_does_worse_returns_its_start(task: Task) -> None:
    teacher = task.base(progress=False).model
    tuned = compress(teacher, policy(finetune_steps=20), task=task)
    wild = type(tuned)(tuned.model, tuned.policy.model_copy(update={"finetune_lr": 10.0, "distill": False}), tuned.layers, tuned.weight_steps, tuned.act_bits, tuned.structured)
    kept = train_further(wild, teacher, task=task, steps=30)
    assert kept.checkpoint["kept"] == "start" and kept.checksum() == tuned.checksum()


@pytest.mark.e2e
def test_a_finalized_search_starts_final_training_from_its_trials_weights_and_exports_models_that_reload_exactly(
    task: Task, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    import autoprune
    from autoprune.compress import load_compressed
    from autoprune.search.record import read_finals, read_trial

    space = {"layers": {"_default": {"w_bits": {"choices": [2, 4]}, "a_bits": 8}}, "policy": {"finetune_steps": 12, "batch_size": 32, "calibration_batches": 2}}
    # a cache named relative to the working directory, as the default `.autoprune/cache` is
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOPRUNE_CACHE", "cache")
    result = autoprune.search(
        task, space=space, trials=3, storage=f"sqlite:///{tmp_path / 'study.db'}", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", priors=False,
        sampler="random", finalize=True, final_steps=20, final_seeds=2, export=tmp_path / "out",
    )
    finals = read_finals(result.study)
    assert finals
    trials = {t.number: read_trial(t) for t in result.study.trials}
    for number, final in finals.items():
        assert final.start_checksum == trials[number].checksum, "final training starts from the trial's fine-tuned weights"
        assert final.mean["accuracy"] >= trials[number].rungs["post_training"]["accuracy"] - 1e-9
        assert len(final.seeds) == 2 and final.interval["accuracy"][0] <= final.mean["accuracy"] <= final.interval["accuracy"][1]
        assert final.weights is not None and Path(final.weights).is_absolute(), "read back from any working directory"
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["rung"] == "final" and report["exported"]
    for row in report["exported"]:
        assert row["reloads_exactly"] is True
        loaded = load_compressed(tmp_path / "out" / row["weights_file"], task=task)
        assert task.evaluate(loaded.model, "val") == finals[row["trial"]].kept["accuracy"]
    assert result.rows()["rung"] == "final"

    # finalized again for longer, the front holds only the longer-trained points: a point trained for 20
    # steps and one for 30 are not comparable (the earlier records stay stored, off the front)
    longer = autoprune.finalize(
        result.study.study_name, storage=f"sqlite:///{tmp_path / 'study.db'}", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", task=task,
        steps=30, select="front", progress=False,
    )
    shown = capsys.readouterr().out
    assert "after final training" in shown
    assert ("note: this front is of the points trained for 30 steps" in shown) == any(f.steps == 20 for f in read_finals(longer.study).values())
    from autoprune.search.pareto import final_front
    from autoprune.search.record import read_meta

    stored = read_finals(longer.study)
    assert read_meta(longer.study).final_steps == 30
    assert {f.steps for _, f in final_front(longer.study, longer.context.objectives)} == {30}
    assert set(stored) >= set(finals) and {f.steps for f in stored.values()} <= {20, 30}


def test_the_final_front_is_of_the_latest_finalize_steps_only() -> None:
    import optuna

    from autoprune.search.objectives import ObjectiveSpec
    from autoprune.search.pareto import final_front
    from autoprune.search.record import FinalRecord, StudyMeta, current_finals, update_meta, write_finals, write_meta
    from autoprune.search.report import earlier_finals_note

    objectives = {"objectives": [{"metric": "accuracy", "direction": "maximize"}, {"metric": "bops", "direction": "minimize"}]}
    study = optuna.create_study(directions=["maximize", "minimize"])
    write_meta(study, StudyMeta(task={}, space={}, objectives=objectives, budget=3))

    def final(steps: int, accuracy: float, bops: float) -> FinalRecord:
        mean = {"accuracy": accuracy, "bops": bops}
        return FinalRecord(steps=steps, seeds=[0], mean=mean, std={}, kept_seed=0, kept=mean, start_checksum="a", checksum="b")

    # trial 1, trained longer, would dominate trial 0 if the two recipes were mixed
    write_finals(study, {0: final(1500, 97.0, 100.0), 1: final(3000, 98.0, 90.0), 2: final(1500, 95.0, 50.0)})
    spec = ObjectiveSpec.from_dict(objectives)
    assert sorted(n for n, _ in final_front(study, spec)) == [1, 2], "a study without a recorded recipe reads every record"
    assert earlier_finals_note(study) is None
    update_meta(study, final_steps=1500)
    assert sorted(current_finals(study)) == [0, 2]
    assert sorted(n for n, _ in final_front(study, spec)) == [0, 2]
    assert "(1 at 3,000 steps)" in earlier_finals_note(study)
    update_meta(study, final_steps=3000)
    assert sorted(n for n, _ in final_front(study, spec)) == [1]
    assert "(2 at 1,500 steps)" in earlier_finals_note(study)


@pytest.mark.e2e
def test_final_training_in_two_processes_trains_what_one_process_trains(tmp_path: Path) -> None:
    import autoprune
    from autoprune.api import finalize
    from autoprune.search.executors import threads_per_process
    from autoprune.search.record import read_finals, read_trial, write_finals
    from autoprune.task import task_from_reference

    task = task_from_reference("tests.test_final_training:teacher_task")
    space = {"layers": {"_default": {"w_bits": {"choices": [2, 8]}, "a_bits": 8}}, "policy": {"finetune_steps": 12, "batch_size": 32, "calibration_batches": 2}}
    stores = {"storage": f"sqlite:///{tmp_path / 'study.db'}", "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    result = autoprune.search(task, space=space, trials=4, priors=False, sampler="random", ladder=False, quiet=True, **stores)
    name = result.study.study_name
    trials = {t.number: read_trial(t) for t in result.study.trials}
    in_two = read_finals(finalize(name, steps=20, select="front", jobs=2, task=task, quiet=True, **stores).study)
    assert len(in_two) >= 2, "two candidates at least, so that both processes train"
    write_finals(result.study, {})
    # each worker trains on one torch thread of the two cores: the same here, or float sums differ in their last bits
    threads = torch.get_num_threads()
    torch.set_num_threads(threads_per_process(2))
    try:
        in_one = read_finals(finalize(name, steps=20, select="front", jobs=1, task=task, quiet=True, **stores).study)
    finally:
        torch.set_num_threads(threads)
    assert set(in_two) == set(in_one)
    for number, final in in_one.items():
        assert in_two[number].checksum == final.checksum, number
        assert {m: final.mean[m] for m in ("accuracy", "full_val_accuracy", "test_accuracy", "bops")} == {m: in_two[number].mean[m] for m in ("accuracy", "full_val_accuracy", "test_accuracy", "bops")}
        assert in_two[number].start_checksum == trials[number].checksum, "the workers replay the trial's fine-tuned weights"
