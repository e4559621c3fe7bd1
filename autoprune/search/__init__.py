"""The search: specs to distributions, trials to policies, the Optuna study, Pareto fronts, export."""
