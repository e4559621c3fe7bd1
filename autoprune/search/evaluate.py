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

    def __init__(self, task: Task, base: BaseModel) -> None:
        from autoprune.cost import measure_cost
        from autoprune.models import compressible_layers

        self.task = task
        self.base = base
        self.layer_names = list(compressible_layers(base.model))
        self.base_cost = measure_cost(base.model, input_shape=task.input_shape)

    @classmethod
    def for_task(cls, task: Task, *, progress: bool = True) -> "Evaluator":
        """Train (or load from the cache) the task's base model with its training-time S/N record."""
        return cls(task, task.base(progress=progress))

    def base_summary(self) -> dict[str, Any]:
        total = self.base_cost.to_dict()["total"]
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

    def score(self, result: Any, *, test: bool = False) -> dict[str, float]:
        """The task's metric (named as the task names it) on the val search subset, and the cost."""
        name = self.task.metric_name
        acc = self.task.evaluate(result.model, "val")
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
        from autoprune.compress import compress

        start = time.perf_counter()
        try:
            result = compress(self.base.model, policy, task=self.task)
        except FloatingPointError as exc:
            raise TrialFailed(f"diverged: {exc}") from None
        metrics = self.score(result)
        metrics["trial_seconds"] = time.perf_counter() - start
        # the activation bits applied, beside the policy's: a layer reading the network input gets the input's
        layers = {name: {**lp.model_dump(), "a_bits_applied": result.act_bits.get(name, lp.a_bits)} for name, lp in result.layers.items()}
        return metrics, layers
