"""The fidelity ladder: one study holds each candidate at the highest of four rungs it deserves.

- rung 0, ``predicted``: the integer program over the base model's sensitivity table, one policy per cost
  budget (``sensitivity_priors``): its exact cost and its predicted loss increase, known within seconds and
  shown before any trial runs (a table, a plot, MLflow metrics). These policies are then the first trials.
- rung 1, ``post_training``: the policy applied with no fine-tune (calibration and BN statistics only).
- rung 2, ``finetune``: the policy's fine-tune (``Policy.finetune_steps`` of the recipe in ``compress``), kept
  only where it beats the candidate's own rung-1 model on validation.
- rung 3, ``final``: final training (``search.finalize``) continues the rung-2 weights by many more steps of the
  same recipe, over several seeds, from the weights whose checksum rung 2 recorded.

A candidate climbs only while its objectives, as predicted from its current rung, could still reach the front
of the rung above (issue 16's promotion rule, ``fidelity.promote``, per rung): its rung-1 values predict its
rung-2 values through the line and margin learned from the candidates that climbed (``fidelity.agreement``);
until three have, every candidate climbs, and so does every prior (a budget's least-predicted-loss policy, a
uniform baseline: chosen on purpose, they anchor the front). A candidate that stops at rung 1 is told PRUNED with its rung-1
metrics (``fidelity = 0``), so no front reads it as a finished one, and it counts toward the trial budget: it
was judged. The study records every rung's metrics (``TrialRecord.rungs``); the front, hypervolume, plots and
export read the highest rung reached and say which.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

from pydantic import BaseModel, ConfigDict

from autoprune.errors import AutopruneError
from autoprune.metrics import parse_bound
from autoprune.search.fidelity import FidelitySpec, promote
from autoprune.search.record import TrialRecord

if TYPE_CHECKING:
    import optuna

RUNGS = ("predicted", "post_training", "finetune", "final")
# the margin of a climb: the same quantile and pairs as multi-fidelity's promotion
CLIMB = FidelitySpec()


class PredictedPoint(BaseModel):
    """Rung 0: one cost budget's least-predicted-loss policy, its exact cost and its predicted loss increase."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    tag: str
    budget: float
    cost: float
    metric: str
    predicted_loss: float
    policy: dict[str, Any]
    summary: str


DEFAULT_STEPS = 1500
"""Final training's steps: on MNIST-1D a 309.8x policy went from 95.95% test after its 150-step fine-tune to
97.65% after 600 more steps and 98.40% after 1,500 (float 98.85%), about 13 s on one core."""

SELECTIONS = ("pareto", "front")


def check_final(*, steps: int, seeds: int, select: str) -> None:
    """Every argument of final training, refused before any work."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise AutopruneError("final_steps", steps, "must be a positive number of training steps")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or not 1 <= seeds <= 100:
        raise AutopruneError("final_seeds", seeds, "must be a number of seeds in 1..100")
    if select not in SELECTIONS:
        try:
            parse_bound(select, names=None)
        except ValueError:
            raise AutopruneError("select", select, f'must be {", ".join(SELECTIONS)}, or a bound on the rung-2 front ("bops<=1e6", "accuracy>=95")') from None


def _climbed(record: TrialRecord) -> Mapping[str, float] | None:
    """A candidate's rung-1 metrics when it also has rung-2 ones (a pair of the climb's line)."""
    return record.rungs.get("post_training") if record.rung == "finetune" else None


def climbs(study: optuna.Study, post_training: Mapping[str, float], *, metrics: Sequence[str], directions: Sequence[str]) -> bool:
    """Whether a candidate with these rung-1 metrics could still reach the rung-2 front, predicted."""
    return promote(study, post_training, metrics=metrics, directions=directions, spec=CLIMB, low_of=_climbed)


def stopped_at_post_training(record: TrialRecord) -> bool:
    return record.rung == "post_training" and "finetune" not in record.rungs


__all__ = ["RUNGS", "CLIMB", "DEFAULT_STEPS", "SELECTIONS", "check_final", "PredictedPoint", "climbs", "stopped_at_post_training"]
