"""Warm start: policies implied by the base model's training, enqueued before any sampling.

Three separable prior kinds, each one small function of a layer's training record, combined per kappa:

- ``snr``: the bit prior. A layer that tolerated weight noise at S/N_l while it trained should tolerate
  quantization noise of a similar size (seed 000 sec. 2.7): its bit-width is the least b whose
  quantization S/N reaches kappa x S/N_l, read at the first epoch that reached the final accuracy
  (``plateau_epoch``). Alone, it sets weight and activation bits and keeps every channel.
- ``keep``: the keep-ratio hint of the layer's weights (``signals.keep_hint``).
- ``a_floor``: activations at no fewer than ``A_FLOOR`` bits (activation noise is not what the weight
  S/N measures).

One policy per kappa is enqueued, clipped into the search space, tagged ``prior=<kinds>:kappa=<k>``
(``snr:kappa=1``, ``snr+keep+a_floor:kappa=0.5``), so a bench can enqueue the bit prior alone and the
trials are told apart in Optuna and MLflow.

A fourth kind, ``sensitivity``, is whole policies rather than a per-layer rule: the integer program's
least-predicted-loss policy for each of K cost budgets (``sensitivity_priors``), from the base model's
sensitivity table (measured once, cached with the model), with the choices of the bound search space, so
the first trials already span the front. Tagged ``prior=sensitivity:budget=<i>``, cheapest first; they are
enqueued before the S/N kinds' policies.

A fifth kind, ``uniform``, is the baselines a user compares a front against: one keep ratio and one bit-width
for every layer (W8A8, W4A4, keep 0.5 W4A4, ...), the most expensive of the grid that fits each of the integer
program's budgets, tagged ``prior=uniform:keep=<k>,bits=<b>``; enqueued after the sensitivity policies, so no
uniform policy can dominate the front unseen.

``sensitivity`` and ``uniform`` are the default: on digits the sensitivity kind gave 1.31-1.37x random search's hypervolume at equal wall time
and reached random's final hypervolume in 16-18% of its time, where the S/N bit prior tied random
(bench/bench_search.py), and on a cold cache it adds 1-2 s (table and 8 solves) to a search on MNIST-1D or
digits. The table is measured with the task's loss, cross-entropy for a built-in task and a user task's own
(``Task.from_model(loss=...)``), by the ``direct`` method, which needs no gradient and no ``(x, y)`` batches.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from optuna.trial import TrialState

from autoprune.policy import LayerPolicy, Policy
from autoprune.processes import this_process
from autoprune.search.record import enqueue, read_meta, read_trial, study_lock, update_meta

A_FLOOR = 8


def _snr(layer: LayerPolicy, prior: Any, kappa: float) -> LayerPolicy:
    bits = prior.bits_by_kappa[kappa]
    return layer.model_copy(update={"w_bits": bits, "a_bits": bits})


def _keep(layer: LayerPolicy, prior: Any, kappa: float) -> LayerPolicy:
    return layer.model_copy(update={"keep_ratio": max(prior.keep_hint, 1e-3)})


def _a_floor(layer: LayerPolicy, prior: Any, kappa: float) -> LayerPolicy:
    return layer.model_copy(update={"a_bits": max(layer.a_bits, A_FLOOR)})


# applied in this order, whatever order a caller names them in
PRIOR_KINDS: dict[str, Callable[[LayerPolicy, Any, float], LayerPolicy]] = {"snr": _snr, "keep": _keep, "a_floor": _a_floor}
SENSITIVITY = "sensitivity"
UNIFORM = "uniform"
DEFAULT_PRIORS: tuple[str, ...] = (SENSITIVITY, UNIFORM)
# every name --priors accepts
KINDS: tuple[str, ...] = (*PRIOR_KINDS, SENSITIVITY, UNIFORM)
# cost budgets the integer program spreads over the cost range
SENSITIVITY_BUDGETS = 8


def prior_tag(kinds: Sequence[str], kappa: float) -> str:
    return f"{'+'.join(k for k in PRIOR_KINDS if k in kinds)}:kappa={kappa:g}"


def prior_policies(evaluator: Any, *, kinds: Sequence[str] = DEFAULT_PRIORS, kappas: tuple[float, ...] | None = None) -> dict[float, Policy]:
    """kappa -> the prior policy of the named kinds (kappas: ``signals.KAPPAS``); empty without a
    training-time S/N record. The bit prior (``snr``) is what kappa varies: without it there is one
    policy, under the first kappa."""
    # signals needs torch: imported here, so that the CLI can list the prior kinds without it
    from autoprune.signals import KAPPAS, layer_priors, plateau_epoch

    kappas = KAPPAS if kappas is None else kappas
    signals = evaluator.base.extras.get("signals")
    if not signals or not any(k in PRIOR_KINDS for k in kinds):
        return {}
    # The last epoch's S/N reflects a learning rate annealed to ~0, not the noise the model tolerates.
    priors = layer_priors(evaluator.base.model, signals, kappas=kappas, epoch=plateau_epoch(signals))
    chosen = [PRIOR_KINDS[k] for k in PRIOR_KINDS if k in kinds]
    policies = {}
    for kappa in kappas if "snr" in kinds else kappas[:1]:
        layers = {}
        for name, prior in priors.items():
            layer = LayerPolicy()
            for apply in chosen:
                layer = apply(layer, prior, kappa)
            layers[name] = layer
        policies[kappa] = Policy(layers=layers)
    return policies


def enqueue_priors(ctx: Any, evaluator: Any, *, kinds: Sequence[str] = DEFAULT_PRIORS) -> list[str]:
    """Enqueue the prior policies the study has not had yet; returns their tags.

    No more than the trials left: a study of fewer trials than priors (a multi-fidelity study counts steps,
    not trials, and takes them all) gets priors spread evenly over the list, which runs from the cheapest
    budget's to the S/N kinds', rather than its first ones and a queue left waiting. A resumed study gets
    the ones it has not had, spread the same way over the trials its budget has left, so a search cut short
    at a few trials and resumed with more still starts from every prior; a prior whose trial was cut short
    (interrupted, or left queued when the budget ran out) is one it has not had. A study begun without priors
    (``--no-priors``) stays without them.

    Processes that start on one study at once take turns (``record.study_lock``): each reads what the others
    enqueued, so the priors are enqueued once, never once per process.
    """
    with study_lock(ctx.study, "priors", owner=this_process()):
        return _enqueue_priors(ctx, evaluator, kinds=kinds)


def _enqueue_priors(ctx: Any, evaluator: Any, *, kinds: Sequence[str]) -> list[str]:
    from autoprune.search.budget import spent

    trials = ctx.study.get_trials(deepcopy=False)
    records = [(t, read_trial(t)) for t in trials]
    if trials and all(r.prior is None for _, r in records):
        return []
    had = {r.prior for t, r in records if not (t.state == TrialState.FAIL and r.interrupted)} - {None}
    queued: list[tuple[dict[str, Any], str]] = []

    def queue(params: dict[str, Any], tag: str) -> None:
        if tag not in had and all(params != seen for seen, _ in queued):
            queued.append((params, tag))

    if SENSITIVITY in kinds or UNIFORM in kinds:
        solutions = sensitivity_solutions(ctx, evaluator)
        chosen = (solutions if SENSITIVITY in kinds else []) + (uniform_solutions(ctx, evaluator, budgets=[s.cost for s in solutions]) if UNIFORM in kinds else [])
        for prior in chosen:
            queue(ctx.space.params_for(prior.policy), prior.tag.removeprefix("prior="))
    policies = prior_policies(evaluator, kinds=kinds)
    if policies and ctx.space.spec.narrow_bits_to_prior is not None and "snr" in kinds:
        meta = read_meta(ctx.study)
        if meta.prior_bits is None:  # a resumed study's space was narrowed when it was loaded
            centre = {name: lp.w_bits for name, lp in policies[1.0].layers.items()}
            update_meta(ctx.study, prior_bits=centre)
            ctx.space.narrowed_to(centre)
    for kappa, policy in policies.items():
        queue(ctx.space.params_for(policy), prior_tag(kinds, kappa))
    # enqueued earlier and not yet run (a search cut off before its queue emptied): they hold slots too
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    room = max(0, ctx.budget - spent(ctx.study) - waiting)
    if ctx.fidelity is None and len(queued) > room:
        queued = [queued[(2 * i + 1) * len(queued) // (2 * room)] for i in range(room)]
    for params, tag in queued:
        enqueue(ctx.study, params, prior=tag, strategy="prior")
    return [tag for _, tag in queued]


UNQUEUED = "interrupted: not run, the budget was spent before its turn (a resume with more trials runs it)"


def drop_waiting(study: Any) -> list[int]:
    """Fail (as interrupted) the enqueued trials still waiting once the budget is spent, so that no trial is
    left WAITING behind a finished search; a resume with more trials enqueues those priors again. Each is
    claimed first, as Optuna's ask claims one (WAITING to RUNNING, atomic in the storage), so a trial another
    process took a moment ago is left to it."""
    from autoprune.search.record import write_trial

    dropped = []
    storage = study._storage
    for trial in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if not storage.set_trial_state_values(trial._trial_id, TrialState.RUNNING):
            continue
        write_trial(study, trial._trial_id, owner=this_process(), failure=UNQUEUED, interrupted=True)
        study.tell(trial.number, state=TrialState.FAIL)
        dropped.append(trial.number)
    return dropped


def sensitivity_policies(ctx: Any, evaluator: Any, *, budgets: int = SENSITIVITY_BUDGETS) -> list[tuple[Policy, str]]:
    """The integer program's policies over ``budgets`` cost budgets, inside the bound space, with their tags."""
    return [(prior.policy, prior.tag) for prior in sensitivity_solutions(ctx, evaluator, budgets=budgets)]


def uniform_solutions(ctx: Any, evaluator: Any, *, budgets: Sequence[float]) -> list[Any]:
    """The uniform policies of the bound space placed along ``budgets`` (the integer program's costs)."""
    from autoprune.search.sensitivity_priors import space_choices, uniform_solutions as place

    template = ctx.space.policy(ctx.space.params_for(Policy()))
    metric = next((m for m in ctx.objectives.metrics if m in ("bops", "macs")), "bops")
    return place(evaluator.base.model, evaluator.task, space_choices=space_choices(ctx.space), budgets=budgets, objective_metric=metric, template=template)


def predicted_front(ctx: Any, evaluator: Any) -> list[Any]:
    """Rung 0 of the fidelity ladder: the integer program's policy per cost budget with its exact cost and its
    predicted loss increase (``search.ladder.PredictedPoint``), cheapest first."""
    from autoprune.search.ladder import PredictedPoint

    metric = next((m for m in ctx.objectives.metrics if m in ("bops", "macs")), "bops")
    layer_names = ctx.space.layer_names
    return [
        PredictedPoint(
            tag=prior.tag.removeprefix("prior="), budget=prior.budget, cost=prior.cost, metric=metric, predicted_loss=prior.loss,
            policy=prior.policy.to_dict(), summary=prior.policy.summary(layer_names),
        )
        for prior in sensitivity_solutions(ctx, evaluator)
    ]


def sensitivity_solutions(ctx: Any, evaluator: Any, *, budgets: int = SENSITIVITY_BUDGETS) -> list[Any]:
    """The integer program's solutions over ``budgets`` cost budgets (policy, tag, cost, predicted loss), inside
    the bound space. The template carries the space's fixed policy fields (order, quantizer, fine-tune steps)."""
    from autoprune.search.sensitivity_priors import sensitivity_solutions as solve, space_choices

    template = ctx.space.policy(ctx.space.params_for(Policy()))
    metric = next((m for m in ctx.objectives.metrics if m in ("bops", "macs")), "bops")
    return solve(evaluator.base.model, evaluator.task, space_choices=space_choices(ctx.space), budgets=budgets, objective_metric=metric, template=template)


__all__ = [
    "PRIOR_KINDS", "DEFAULT_PRIORS", "SENSITIVITY", "UNIFORM", "KINDS", "A_FLOOR", "prior_policies", "enqueue_priors", "prior_tag", "sensitivity_policies",
    "sensitivity_solutions", "uniform_solutions", "predicted_front", "drop_waiting", "UNQUEUED",
]
