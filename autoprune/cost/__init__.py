"""The ideal-hardware cost model: MACs, BOPs, ESN_a, ESN_d, ESN'_d, memory and performance density.

An *ideal hardware* (seed 000 sec. 2) spends energy only on nonzero weights and nonzero operands, and its
cost falls monotonically with bit-width. For every Conv1d / Conv2d / Linear layer l that runs in one forward
pass of one sample (H_out x W_out output positions of a Conv2d, L_out of a Conv1d, 1 of a Linear; written
H_out x W_out below):

- W_int = midrise_int(W, delta, w_bits) (seed 000 App. A), delta = max|W| / 2^(w_bits-1) unless the caller
  gives the quantizer's own step. A float layer is read at 32 bits by the same mid-rise rule, so every layer
  has integer levels and the ESN of a float model is finite and comparable. A weight is *nonzero* when its
  level is: exact zeros of W and filters the mid-rise rule zeroes count as removed.
- What counts as pruned: a weight a structural cut removed (absent from the shapes), a weight an unstructured
  mask zeroed, or a weight the quantizer mapped to zero. The cost model sees the baked weights, where all three
  are exact zeros, and cannot tell a removed weight from a float weight that happens to be 0.0 (3 of 20 seeded
  VGG7 builds draw one). So ``LayerQuant`` says which: in a quantized layer (w_bits < 32) exact zeros are
  pruned; in a float layer they are pruned only when ``masked`` (the policy gave the layer a weight sparsity),
  and otherwise read as +-0.5 like any float weight (no zero level at 32 bits), so a float model costs its
  dense MACs exactly.
- MACs_l = nonzero weights x H_out x W_out x (1 - s_f) (DJPQ eq. 15). For a dense conv that is
  out x in/groups x k_h x k_w x H_out x W_out (out x in/groups x k x L_out for a Conv1d); channels removed by structured pruning are absent from the
  shapes, so they leave this layer and the next. Unstructured weight sparsity enters through the nonzero
  count, input-feature sparsity s_f through (1 - s_f). Bias, BN, pooling and adds are not counted.
- BOPs_l = MACs_l x b_w,l x b_a,l (DJPQ eq. 16), b_a,l being the bits of what layer l *reads*: its own
  ``a_bits``, or ``input_bits`` when it reads the network input. The float model (no per-layer settings,
  input_bits = 32) has BOPs = MACs x 1024 exactly.
- ESN_a = sum_l ||W_int^l||_F^2 (eq. 2, c^l = 1).
- Layer weighting c^l of eq. 1, applied linearly: c^l x (the layer's sum). Two weightings are reported, named
  by what they measure: ``esn_a`` / ``esn_d`` take c^l = 1 and relate to the parameters (memory);
  ``esn_a_comp`` / ``esn_d_comp`` take c^l = the computations per parameter, H_out x W_out x (1 - s_f) (the
  MACs each nonzero weight takes part in, s_f skipping zero operands as MACs do), and relate to the
  computations. ESN'_d already weights per filter by its MACs.
- ESN_d = sum_l sum_i bits(W_int,i) with bits(|x|) = max(1, ceil(log2|x| + 1)), 0 for a zero level. This is
  the *linear* sum of bits with c^l = 1: eq. 3 prints a squared Frobenius norm, but eq. 6 and the text
  (energy proportional to the number of bits) are linear, and so is autoprune.
- ESN'_d = sum_l sum_m MAC_{l,m} x bits(max|W_int^{l,m}|) (eq. 7), where MAC_{l,m} = nonzero weights of output
  filter m x H_out x W_out x (1 - s_f): variable-precision MAC arrays pay each filter's largest level. With
  one step per layer it equals MACs x b only when every filter reaches the layer's top level.
- memory_mb (seed 004 App. B.1, "size of weight and feature combined") = (nonzero weights x w_bits +
  input feature-map elements per sample x a_bits x (1 - s_f)) / 1e6, in megabits. Each layer counts the
  feature map it reads (the network input included, at input_bits, as B.1 sizes features from the input
  shape); the final output (logits) is not counted, and a tensor read by two layers (a block's first conv
  and its projection shortcut) is counted by each, as each reads its own copy. Bias is not counted (B.1
  keeps it at high precision outside the budget).
- performance density = accuracy (%) / memory_mb (seed 004, Acc/Mb).
- ESN_a from S/N (eq. 4): S/N x ||W||_0 / 12 with S/N = ||W||_F^2 / ||W - delta W_int||_F^2
  (`esn_a_from_snr`); it matches ESN_a when the quantization noise is uniform.

Beyond Conv / Linear layers (docs/sequence-models.md): attention and recurrent layers are costed as their
Linear-layer equivalents (``autoprune.models.convert``: projections, every gate at every step); a product of
two activations (``MatMul``: QK^T, AV) costs MACs = output elements x inner size and BOPs = MACs x the bits of
its two inputs; an embedding costs no MACs (lookups, and its table as memory); a multiplication written in a
forward outside these modules is counted at the dispatch level as a float ``op`` row (``autoprune.cost.ops``).
Normalizations and nonlinearities are listed with their element counts (``elements``); what multiplies but
has no formula is listed in ``uncounted``, never dropped.

All sums are float64: at 32 bits one weight's ESN_a term reaches 2^62.
"""

from autoprune.cost.esn import esn_a, esn_a_from_snr, esn_d, filter_bits
from autoprune.cost.measure import CostReport, CostTotal, LayerCost, LayerQuant, measure_cost
from autoprune.cost.table import format_cost_table, format_count

__all__ = [
    "CostReport", "CostTotal", "LayerCost", "LayerQuant", "measure_cost", "format_cost_table", "format_count",
    "esn_a", "esn_d", "filter_bits", "esn_a_from_snr",
]

from autoprune._callable import make_callable  # noqa: E402 - after the package's own names

# autoprune.cost(model, input_shape=...) is the API's cost, though autoprune.cost is also this package.
make_callable(__name__, "autoprune.api:cost")
