"""Strategies: how a trial turns its parameters into a scored model. The space spec names one (``strategy:``);
every executor runs it through the same lifecycle, so all strategies share one study, front, plots and MLflow.

- ``sampled`` (default): the parameters are a policy; compress it and score, post-training then fine-tuned
  (``Evaluator.climb``; in-process, the fidelity ladder decides between the two: ``search.ladder``).
- ``djpq`` / ``two_stage``: the parameters are the regularisation strengths of a DJPQ run (seed 002) or of
  its two-stage baseline (sec. 4.2), read from the spec's ``djpq:`` block. The run learns bits and widths;
  the learned DJPQ model is scored as it is (its own non-linear quantizers, the cost model at its learned
  bits), the learned policy becomes the trial's policy (``apply`` replays it with our quantizers) and the
  model file is kept at ``TrialJob.artifact`` for export (``DJPQModel.save``). A DJPQ run's seed is the
  study's seed plus the trial number, recorded with its config in ``TrialRecord.learn``.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

from pydantic import BaseModel, ConfigDict

from autoprune.search.evaluate import Evaluator, TrialFailed

StrategyName = Literal["sampled", "djpq", "two_stage"]
# the strategies that learn a policy instead of sampling one (the spec's ``djpq:`` block configures them)
LEARNED: tuple[str, ...] = ("djpq", "two_stage")
STRATEGY_NAMES: tuple[str, ...] = ("sampled", *LEARNED)
# DJPQ settings a spec may not set: the seed follows the trial
UNSEARCHED = ("seed",)


class TrialJob(BaseModel):
    """What a worker needs to run one trial, JSON across processes and Ray: a policy, or a DJPQ config
    and where to keep the learned model."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    strategy: StrategyName = "sampled"
    policy: dict[str, Any] | None = None
    learn: dict[str, Any] | None = None
    artifact: str | None = None
    # fixed policy fields of the spec (say finetune_steps) that the learned policy carries for its replay
    replay: dict[str, Any] | None = None


Scored = tuple[dict[str, float], dict[str, dict[str, Any]], dict[str, Any]]
"""metrics, the per-layer settings applied, and TrialRecord fields the strategy learned (policy, artifact)."""


def artifact_path(study_name: str) -> Path:
    """A fresh file for a learned model under the cache (the trial records the path; export reads it)."""
    from autoprune.files import cache_root

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in study_name)
    return cache_root() / "djpq" / safe / f"{uuid.uuid4().hex}.safetensors"


def _run_sampled(evaluator: Evaluator, job: TrialJob) -> Scored:
    from autoprune.policy import Policy

    return evaluator.climb(Policy.from_dict(job.policy or {}))


def _run_learned(evaluator: Evaluator, job: TrialJob) -> Scored:
    from autoprune.djpq import DJPQConfig, learn_policy, learn_two_stage
    from autoprune.policy import Policy

    learn = learn_policy if job.strategy == "djpq" else learn_two_stage
    start = time.perf_counter()
    try:
        result = learn(evaluator.base.model, task=evaluator.task, config=DJPQConfig.from_dict(job.learn or {}))
    except FloatingPointError as exc:
        raise TrialFailed(f"diverged: {exc}") from None
    metrics = evaluator.score(result)
    metrics["trial_seconds"] = time.perf_counter() - start
    policy = Policy.from_dict({**result.policy.to_dict(), **(job.replay or {})})
    fields: dict[str, Any] = {"policy": policy.to_dict()}
    if job.artifact:
        fields["artifact"] = str(result.model.save(job.artifact))
    return metrics, {name: lp.model_dump() for name, lp in policy.layers.items()}, fields


STRATEGIES: dict[str, Callable[[Evaluator, TrialJob], Scored]] = {
    "sampled": _run_sampled,
    "djpq": _run_learned,
    "two_stage": _run_learned,
}


def run_job(evaluator: Evaluator, job: TrialJob) -> Scored:
    """One trial's job by its strategy: metrics, layers and the record fields it learned."""
    return STRATEGIES[job.strategy](evaluator, job)


def learned_config(values: Mapping[str, Any], *, seed: int) -> dict[str, Any]:
    """The DJPQ config of one trial, validated: the spec's fixed and sampled settings and the trial's seed."""
    from autoprune.djpq import DJPQConfig

    return DJPQConfig.from_dict({**values, "seed": seed}).model_dump()


__all__ = ["TrialJob", "STRATEGIES", "STRATEGY_NAMES", "LEARNED", "Scored", "run_job", "artifact_path", "learned_config"]
