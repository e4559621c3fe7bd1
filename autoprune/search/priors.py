"""Warm start: policies implied by the base model's training-time S/N, enqueued before any sampling.

A layer that tolerated weight noise at S/N_l while it trained should tolerate quantization noise of a
similar size (seed 000 sec. 2.7): its prior bit-width is the least b whose quantization S/N reaches
kappa x S/N_l, read at the first epoch that reached the final accuracy (``plateau_epoch``). One policy
per kappa is enqueued, clipped into the search space, and tagged
``prior=kappa=<k>`` so the trials can be told apart in Optuna and MLflow.
"""

from __future__ import annotations

from typing import Any

from autoprune.policy import LayerPolicy, Policy

KAPPAS = (0.5, 1.0, 2.0)


def prior_policies(evaluator: Any, *, kappas: tuple[float, ...] = KAPPAS) -> dict[float, Policy]:
    from autoprune.signals import layer_priors, plateau_epoch

    signals = evaluator.base.extras.get("signals")
    if not signals:
        return {}
    # The last epoch's S/N reflects a learning rate annealed to ~0, not the noise the model tolerates.
    priors = layer_priors(evaluator.base.model, signals, kappas=kappas, epoch=plateau_epoch(signals))
    policies = {}
    for kappa in kappas:
        layers = {
            name: LayerPolicy(keep_ratio=max(prior.keep_hint, 1e-3), w_bits=prior.bits_by_kappa[kappa], a_bits=max(prior.bits_by_kappa[kappa], 8))
            for name, prior in priors.items()
        }
        policies[kappa] = Policy(layers=layers)
    return policies


def enqueue_priors(ctx: Any, evaluator: Any) -> list[int]:
    """Enqueue the prior policies on a study that has no trials yet; returns how many were enqueued."""
    if ctx.study.get_trials(deepcopy=False):
        return []
    policies = prior_policies(evaluator)
    if not policies:
        return []
    if ctx.space.spec.narrow_bits_to_prior is not None:
        centre = {name: lp.w_bits for name, lp in policies[1.0].layers.items()}
        meta = dict(ctx.study.user_attrs["autoprune"])
        meta["prior_bits"] = centre
        ctx.study.set_user_attr("autoprune", meta)
        ctx.space.narrowed_to(centre)
    seen: list[dict[str, Any]] = []
    for kappa, policy in policies.items():
        params = ctx.space.params_for(policy)
        if params in seen:
            continue
        seen.append(params)
        ctx.study.enqueue_trial(params, user_attrs={"prior": f"kappa={kappa:g}"})
    return list(range(len(seen)))
