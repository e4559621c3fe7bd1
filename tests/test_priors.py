"""Prior kinds are separable: the S/N bit prior alone, the keep-ratio hint, the activation floor."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from autoprune.search import priors
from autoprune.signals import LayerPrior

LAYERS = {"conv1": LayerPrior(snr=30.0, esn_a_train=1.0, bits_by_kappa={0.5: 3, 1.0: 4, 2.0: 5}, keep_hint=0.6),
          "fc": LayerPrior(snr=10.0, esn_a_train=1.0, bits_by_kappa={0.5: 2, 1.0: 2, 2.0: 3}, keep_hint=0.9)}


@pytest.fixture
def evaluator(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    import autoprune.signals as signals

    monkeypatch.setattr(signals, "layer_priors", lambda model, record, *, kappas, epoch: LAYERS)
    monkeypatch.setattr(signals, "plateau_epoch", lambda record: 0)
    return SimpleNamespace(base=SimpleNamespace(model=None, extras={"signals": {"epochs": [0]}}))


def test_the_bit_prior_alone_sets_bits_and_nothing_else(evaluator: SimpleNamespace) -> None:
    policies = priors.prior_policies(evaluator, kinds=("snr",))
    assert sorted(policies) == [0.5, 1.0, 2.0]
    for kappa, policy in policies.items():
        for name, layer in policy.layers.items():
            bits = LAYERS[name].bits_by_kappa[kappa]
            assert (layer.w_bits, layer.a_bits, layer.keep_ratio) == (bits, bits, 1.0)
    assert priors.prior_tag(("snr",), 1.0) == "snr:kappa=1"


def test_kinds_combine_in_a_fixed_order_whatever_order_they_are_named_in(evaluator: SimpleNamespace) -> None:
    policy = priors.prior_policies(evaluator, kinds=("a_floor", "keep", "snr"))[1.0]
    assert policy.layers["conv1"].model_dump(include={"w_bits", "a_bits", "keep_ratio"}) == {"w_bits": 4, "a_bits": priors.A_FLOOR, "keep_ratio": 0.6}
    assert policy.layers["fc"].keep_ratio == 0.9
    assert priors.prior_tag(("a_floor", "snr", "keep"), 0.5) == "snr+keep+a_floor:kappa=0.5"


def test_the_keep_hint_alone_keeps_float_bits(evaluator: SimpleNamespace) -> None:
    policies = priors.prior_policies(evaluator, kinds=("keep",))
    assert list(policies) == [0.5]  # kappa only varies the bit prior: one policy
    layer = policies[0.5].layers["conv1"]
    assert (layer.keep_ratio, layer.w_bits, layer.a_bits) == (0.6, 32, 32)
    assert priors.prior_policies(evaluator, kinds=()) == {}


def _recording_ctx(monkeypatch: pytest.MonkeyPatch, *, budget: int = 60) -> tuple[SimpleNamespace, list[str]]:
    """A new study of ``budget`` trials that records the tags enqueued on it."""
    enqueued: list[str] = []
    monkeypatch.setattr(priors, "enqueue", lambda study, params, *, prior, strategy: enqueued.append(prior))
    space = SimpleNamespace(params_for=lambda policy: policy.to_dict(), spec=SimpleNamespace(narrow_bits_to_prior=None))
    return SimpleNamespace(study=SimpleNamespace(get_trials=lambda deepcopy: []), space=space, budget=budget, fidelity=None), enqueued


def _solved(policies: list[tuple[object, str]]) -> list[object]:
    from autoprune.search.sensitivity_priors import SolvedPrior

    return [SolvedPrior(policy=policy, tag=tag, budget=float(i + 1), cost=float(i + 1), loss=0.0) for i, (policy, tag) in enumerate(policies)]


def _patch_solutions(monkeypatch: pytest.MonkeyPatch, policies: list[tuple[object, str]], uniform: list[tuple[object, str]] = ()) -> None:
    monkeypatch.setattr(priors, "sensitivity_solutions", lambda ctx, ev: _solved(policies))
    monkeypatch.setattr(priors, "uniform_solutions", lambda ctx, ev, *, budgets: _solved(list(uniform)))


def test_the_default_enqueues_the_sensitivity_policies_then_the_uniform_ones(evaluator: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    from autoprune.policy import Policy

    ctx, enqueued = _recording_ctx(monkeypatch)
    cheap = Policy(layers={"conv1": {"w_bits": 2}})
    uniform = Policy(layers={"_default": {"w_bits": 4, "a_bits": 4}})
    _patch_solutions(monkeypatch, [(cheap, "prior=sensitivity:budget=0"), (Policy(), "prior=sensitivity:budget=1")], [(uniform, "prior=uniform:keep=1,bits=4")])
    evaluator.task = SimpleNamespace(spec=object())  # a built-in task
    # no S/N policy: the bench found it tied random
    assert priors.enqueue_priors(ctx, evaluator) == enqueued == ["sensitivity:budget=0", "sensitivity:budget=1", "uniform:keep=1,bits=4"]


def test_a_user_task_gets_the_sensitivity_policies_too(evaluator: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    from autoprune.policy import Policy

    ctx, enqueued = _recording_ctx(monkeypatch)
    _patch_solutions(monkeypatch, [(Policy(), "prior=sensitivity:budget=0")])
    evaluator.task = SimpleNamespace(spec=None)  # Task.from_model: its table is measured with its own loss
    assert priors.enqueue_priors(ctx, evaluator) == enqueued == ["sensitivity:budget=0"]


@pytest.mark.parametrize(("budget", "kept"), [(8, [0, 1, 2, 3, 4, 5, 6, 7]), (4, [1, 3, 5, 7]), (3, [1, 4, 6]), (1, [4])])
def test_a_budget_of_fewer_trials_than_priors_gets_them_spread_over_the_cost_range(
    evaluator: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, budget: int, kept: list[int]
) -> None:
    from autoprune.policy import Policy

    ctx, enqueued = _recording_ctx(monkeypatch, budget=budget)
    eight = [(Policy(finetune_steps=10 + i), f"prior=sensitivity:budget={i}") for i in range(8)]
    _patch_solutions(monkeypatch, eight)
    evaluator.task = SimpleNamespace(spec=object())
    assert priors.enqueue_priors(ctx, evaluator) == enqueued == [f"sensitivity:budget={i}" for i in kept]


def test_a_resumed_study_gets_the_priors_it_has_not_had_spread_over_the_trials_left(
    evaluator: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    import optuna

    from autoprune.policy import Policy

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"])
    _patch_solutions(monkeypatch, [(Policy(finetune_steps=10 + i), f"prior=sensitivity:budget={i}") for i in range(8)])
    evaluator.task = SimpleNamespace(spec=object())
    space = SimpleNamespace(params_for=lambda policy: {"finetune_steps": policy.finetune_steps}, spec=SimpleNamespace(narrow_bits_to_prior=None))
    ctx = SimpleNamespace(study=study, space=space, budget=3, fidelity=None)

    def run_all() -> None:
        while study.get_trials(states=(optuna.trial.TrialState.WAITING,)):
            study.tell(study.ask(), [90.0, 1.0])

    assert priors.enqueue_priors(ctx, evaluator) == [f"sensitivity:budget={i}" for i in (1, 4, 6)]
    study.tell(study.ask(), [90.0, 1.0])  # cut off after one trial: two priors still wait
    ctx.budget = 4  # resumed with one more trial than that: one of the five it has not had
    assert priors.enqueue_priors(ctx, evaluator) == ["sensitivity:budget=3"]
    run_all()
    ctx.budget = 7  # three more trials: three of the four it has not had, spread
    assert priors.enqueue_priors(ctx, evaluator) == [f"sensitivity:budget={i}" for i in (0, 5, 7)]
    run_all()
    ctx.budget = 60
    assert priors.enqueue_priors(ctx, evaluator) == ["sensitivity:budget=2"]
    run_all()
    assert priors.enqueue_priors(ctx, evaluator) == []

    without = SimpleNamespace(study=optuna.create_study(directions=["maximize", "minimize"]), space=space, budget=60, fidelity=None)
    without.study.tell(without.study.ask(), [90.0, 1.0])  # begun with --no-priors
    assert priors.enqueue_priors(without, evaluator) == []


def test_a_resumed_search_samples_the_space_its_first_run_narrowed_to_the_prior(tmp_path) -> None:  # noqa: ANN001
    """As every worker does (context_from_study): the resumed driver sampled the whole space before."""
    from autoprune.api import search_config
    from autoprune.search import study
    from autoprune.search.record import read_meta, write_meta

    (tmp_path / "space.yaml").write_text("narrow_bits_to_prior: 1\nlayers: {_default: {w_bits: {choices: [2, 3, 4, 5, 6, 8]}}}\n")
    config = search_config(space_path=tmp_path / "space.yaml", study="s", storage=f"sqlite:///{tmp_path / 's.db'}", trials=2, priors=False, progress=False)
    first = study.prepare(config)
    layers = [name for name, dims in first.space.layer_dims.items() if "w_bits" in dims]
    write_meta(first.study, read_meta(first.study).model_copy(update={"prior_bits": {name: 4 for name in layers}}))

    resumed = study.prepare(config)
    assert layers and all(list(resumed.space.layer_dims[name]["w_bits"].values()) == [3, 4, 5] for name in layers)
    assert resumed.space.distributions() == study.context_from_study(resumed.study).space.distributions()
