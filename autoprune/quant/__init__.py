"""Quantization: fake quantizers with a straight-through estimator, registered by name, and the model-level
steps around them (calibration, delayed-quantization step counter, baking, BN recalibration).

Weight quantizers (``policy.quantizer``, configs ``Midrise``, ``ClipUniform``, ``Delayed``, ``Saturated``):
``midrise`` (seed 000 App. A, the cost model's own levels), ``clip_uniform`` (seed 003 eq. 20-21), ``delayed``
(seed 004 eq. 5), ``saturated`` (seed 004 eq. 6-7). Activation quantizers (``policy.act_quantizer``, configs
``ClipUniformAct``, ``DelayedAct``, ``SaturatedAct``). Each quantizer class is registered as the handler of its
config class.
"""

from autoprune.operators import (
    ACT_QUANTIZERS, WEIGHT_QUANTIZERS, ClipUniform, ClipUniformAct, Delayed, DelayedAct, Midrise, Saturated, SaturatedAct,
)
from autoprune.quant.act import (
    ActQuantizer, ClipUniformActQuantizer, DelayedActQuantizer, SaturatedActQuantizer, act_quantizer,
    make_act_quantizer, register_act_quantizer,
)
from autoprune.quant.midrise import level_bits, midrise_delta, midrise_int
from autoprune.quant.model import (
    ACT_QUANT, SECOND_ACT_QUANT, advance_quantizers, attach_act_quantizer, bake_weights, calibrate, float_activations, recalibrate_batchnorm,
)
from autoprune.quant.pow2 import pow2_bit_map, pow2_bits
from autoprune.quant.grids import GRIDS, MIDRISE, MIDTREAD, Grid
from autoprune.quant.weight import (
    ClipUniformWeight, DelayedWeight, MidriseWeight, SaturatedWeight, WeightQuantizer,
    make_weight_quantizer, register_weight_quantizer, weight_quantizer,
)

__all__ = [
    "ACT_QUANT", "SECOND_ACT_QUANT", "ACT_QUANTIZERS", "WEIGHT_QUANTIZERS",
    "Midrise", "ClipUniform", "Delayed", "Saturated", "ClipUniformAct", "DelayedAct", "SaturatedAct",
    "ActQuantizer", "ClipUniformActQuantizer", "DelayedActQuantizer", "SaturatedActQuantizer", "act_quantizer",
    "make_act_quantizer",
    "register_act_quantizer",
    "WeightQuantizer", "MidriseWeight", "ClipUniformWeight", "DelayedWeight", "SaturatedWeight",
    "weight_quantizer", "make_weight_quantizer", "register_weight_quantizer",
    "midrise_delta", "midrise_int", "level_bits", "pow2_bits", "pow2_bit_map",
    "Grid", "GRIDS", "MIDRISE", "MIDTREAD",
    "attach_act_quantizer", "advance_quantizers", "calibrate", "float_activations", "bake_weights", "recalibrate_batchnorm",
]
