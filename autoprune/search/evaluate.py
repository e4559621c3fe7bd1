"""evaluate(policy) -> metrics: the one function every executor (in-process, worker, Ray) runs per trial."""

from __future__ import annotations

import math
import time
from typing import Any

from autoprune.policy import Policy
from autoprune.task import BaseModel, Task


class TrialFailed(Exception):
    """A trial that ran but produced nothing usable (diverged, NaN); the study records it as failed."""


class Evaluator:
    """Holds the task and its trained base model; scores compressed models on the cost model."""

    def __init__(self, task: Task, base: BaseModel, *, latency: bool = False) -> None:
        from autoprune.cost import measure_cost
        from autoprune.models import compressible_layers

        self.task = task
        self.base = base
        self.layer_names = list(compressible_layers(base.model))
        self.base_cost = measure_cost(base.model, input_shape=task.input_shape)
        # ``latency_ms`` is scored only when asked for: its table is measured on this machine, point by point
        self.latency: Any = None
        if latency:
            from autoprune.deploy.latency import LatencyModel

            self.latency = LatencyModel(base.model, input_shape=task.input_shape)

    @classmethod
    def for_task(cls, task: Task, *, progress: bool = True, latency: bool = False) -> "Evaluator":
        """Train (or load from the cache) the task's base model with its training-time S/N record; ``latency``:
        score ``latency_ms`` with the latency model of this machine."""
        return cls(task, task.base(progress=progress), latency=latency)

    def base_summary(self) -> dict[str, Any]:
        total = self.base_cost.to_dict()["total"]
        if self.latency is not None:
            # the float base model's latency: the reference of latency_ms in the hypervolume and the plots
            total["latency_ms"] = self.latency.estimate(self.latency.float_base()).total_ms
        extras = self.base.extras
        priors = extras.get("priors") or {"source": "training" if extras.get("signals") else "none"}
        return {
            "metric": self.task.metric_name,
            "val_accuracy": self.base.val_accuracy,
            "test_accuracy": self.base.test_accuracy,
            "train_seconds": self.base.train_seconds,
            "cost": total,
            "performance_density": self.base.val_accuracy / total["memory_mb"],
            "priors": priors,
        }

    def validate(self, policy: Policy) -> None:
        """Every name and choice of the policy, checked before any work starts."""
        from autoprune.compress import check_policy

        check_policy(self.base.model, policy, input_shape=self.task.input_shape)

    def score(self, result: Any, *, test: bool = False, val: float | None = None) -> dict[str, float]:
        """The task's metric (named as the task names it) on the val search subset (``val`` when the caller has
        just measured it on that model), and the cost."""
        name = self.task.metric_name
        acc = self.task.evaluate(result.model, "val") if val is None else val
        if not math.isfinite(acc):
            raise TrialFailed(f"{name} is {acc}")
        total = result.cost(self.task.input_shape).to_dict()["total"]
        base_total = self.base_cost.to_dict()["total"]
        metrics = {
            name: acc,
            f"{name}_drop": self.base.val_accuracy - acc,
            **{k: float(v) for k, v in total.items()},
            "performance_density": acc / total["memory_mb"] if total["memory_mb"] > 0 else math.inf,
            "bops_reduction": base_total["bops"] / total["bops"] if total["bops"] > 0 else math.inf,
            "compress_seconds": result.seconds,
        }
        if self.latency is not None:
            metrics["latency_ms"] = self.latency.estimate(result).total_ms
        metrics.update(self.interval(acc))
        if test:
            metrics[f"test_{name}"] = self.task.evaluate(result.model, "test", full=True)
            metrics[f"full_val_{name}"] = self.task.evaluate(result.model, "val", full=True)
        return metrics

    def interval(self, value: float) -> dict[str, float]:
        """The metric's 95% Wilson interval on the val search subset and that subset's size, as metrics
        (``{name}_ci_low``, ``{name}_ci_high``, ``val_samples``); none for a metric that is not an accuracy,
        whose per-sample values the metric API does not expose for a bootstrap."""
        n = self.task.scored_samples("val")
        if n is None or not self.task.metric_is_accuracy:
            return {}
        from autoprune.intervals import wilson

        low, high = wilson(min(100.0, max(0.0, value)), n)
        name = self.task.metric_name
        return {f"{name}_ci_low": low, f"{name}_ci_high": high, "val_samples": float(n)}

    def evaluate(self, policy: Policy) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
        """Compress and score; returns the metrics and the per-layer settings actually applied."""
        start = time.perf_counter()
        result = self._compress(policy)
        metrics = self.score(result, val=result.checkpoint.get("val"))
        metrics["trial_seconds"] = time.perf_counter() - start
        return metrics, _layers(result)

    # --- the fidelity ladder (search.ladder): post-training (rung 1), then the fine-tune (rung 2) ----------

    def post_training(self, policy: Policy) -> tuple[Any, dict[str, float]]:
        """Rung 1: the policy's post-training compression and its scores."""
        start = time.perf_counter()
        result = self._compress(policy.model_copy(update={"finetune_steps": 0}))
        metrics = self.score(result)
        metrics["trial_seconds"] = time.perf_counter() - start
        return result, metrics

    def fine_tuned(self, policy: Policy, *, post_training: tuple[Any, dict[str, float]]) -> tuple[dict[str, float], dict[str, dict[str, Any]], dict[str, Any]]:
        """Rung 2: the policy's fine-tune, kept only where it beats rung 1's model (``compress``'s keep_best).
        Returns its metrics, its layers, and the record of the ladder: each rung's metrics, the rung reached and
        the checksum of the weights final training starts from."""
        ptq, ptq_metrics = post_training
        start = time.perf_counter()
        result = self._compress(policy, post_training=ptq)
        metrics = self.score(result, val=result.checkpoint.get("val"))
        metrics["trial_seconds"] = ptq_metrics["trial_seconds"] + time.perf_counter() - start
        rungs = {"post_training": ptq_metrics, "finetune": metrics}
        return metrics, _layers(result), {"rungs": rungs, "rung": "finetune", "checksum": result.checksum()}

    def climb(self, policy: Policy) -> tuple[dict[str, float], dict[str, dict[str, Any]], dict[str, Any]]:
        """Rung 1 then rung 2, when nothing decides in between whether the candidate climbs (Ray's workers)."""
        if policy.finetune_steps == 0:
            result, metrics = self.post_training(policy)
            return metrics, _layers(result), {"rungs": {"post_training": metrics}, "rung": "post_training", "checksum": result.checksum()}
        if not policy.keep_best:
            metrics, layers = self.evaluate(policy)
            return metrics, layers, {}
        return self.fine_tuned(policy, post_training=self.post_training(policy))

    def _compress(self, policy: Policy, *, post_training: Any = None) -> Any:
        from autoprune.compress import compress

        try:
            return compress(self.base.model, policy, task=self.task, post_training=post_training)
        except FloatingPointError as exc:
            raise TrialFailed(f"diverged: {exc}") from None


def _layers(result: Any) -> dict[str, dict[str, Any]]:
    # the activation bits applied, beside the policy's: a layer reading the network input gets the input's
    return {name: {**lp.model_dump(), "a_bits_applied": result.act_bits.get(name, lp.a_bits)} for name, lp in result.layers.items()}
