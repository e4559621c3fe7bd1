"""The search: specs to distributions, trials to policies, the Optuna study, Pareto fronts, export."""

import sys
import types


class _CallablePackage(types.ModuleType):
    """``autoprune.search`` is this package and also the API's ``search`` function: importing any of its
    modules rebinds the attribute to the package, so the package itself runs a search when called."""

    def __call__(self, *args: object, **kwargs: object) -> object:
        from autoprune.api import search

        return search(*args, **kwargs)  # type: ignore[arg-type]


sys.modules[__name__].__class__ = _CallablePackage
