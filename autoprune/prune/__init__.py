"""Pruning: structured (whole channels, pruners registered per config) and unstructured (weights, features).

Pruner configs (``policy.pruner``): ``SignalNorm`` (takes keep ratios), ``PfQ`` (chooses channels itself), ``NoPruning``.
"""

from autoprune.operators import NoPruning, PfQ, SignalNorm

from autoprune.prune.pfq import fold_batchnorm
from autoprune.prune.structured import (
    ChannelGroup,
    LayerPruning,
    PrunePlan,
    PruneRequest,
    StructuredRecord,
    channel_groups,
    searched_groups,
    dependency_graph,
    groups_in_graph,
    keep_count,
    pinned_in_graph,
    pinned_widths,
    prune_structured,
    pruner,
    register_pruner,
    replay_structured,
)

from autoprune.prune.unstructured import FeatureMask, FeatureMasker, WeightMasker, attach_feature_mask, keep_largest, sparsity_at

__all__ = [
    "NoPruning", "PfQ", "SignalNorm",
    "ChannelGroup", "LayerPruning", "PrunePlan", "PruneRequest", "StructuredRecord", "channel_groups", "fold_batchnorm",
    "dependency_graph", "groups_in_graph", "pinned_in_graph", "pinned_widths",
    "keep_count", "prune_structured", "FeatureMask", "FeatureMasker", "WeightMasker", "attach_feature_mask",
    "keep_largest", "sparsity_at", "pruner", "register_pruner", "replay_structured", "searched_groups",
]
