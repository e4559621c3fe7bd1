"""The search: specs to distributions, trials to policies, the Optuna study, Pareto fronts, export."""

from autoprune._callable import make_callable

# autoprune.search(task, ...) is the API's search, though autoprune.search is also this package.
make_callable(__name__, "autoprune.api:search")
