"""DJPQ: differentiable joint pruning and quantization (seed 002), learned in one training run.

Where the policy search *samples* bits and widths, DJPQ *learns* them: every Conv2d / Linear layer l gets a
learnable quantizer for its weights and for the activations it reads, every channel group a VIBNet gate,
and one loss trades accuracy against BOPs. Equation numbers are those of ``002_5e292d3579ad461f.txt``.

Quantizer (sec. 3.1), parameters q_s (fixed, ``q_s_ratio`` x the initial q_m), q_m, t and d per tensor:

- eq. 1-2: x_q = sign(x) d round(u(x) / d), u(x) = 0 for |x| < q_s (and x_q = 0 there),
  (|x| - q_s)^t for q_s <= |x| <= q_m, (q_m - q_s)^t above. Activations use t = 1 (not learned).
- eq. 3 (weights, symmetric grid): b = log2 ceil((q_m - q_s)^t / d + 1) + 1;
  eq. 4 (unsigned ReLU activations): b = log2 ceil((q_m - q_s)^t / d). A layer reading signed features
  (no ReLU before it) takes eq. 3. The layer reading the network input reads it at ``input_bits`` (App. B.3),
  quantized on the fixed uniform grid of its largest magnitude seen (as the replayed policy's input quantizer).
- eq. 5-7 (straight-through rounding), with v = u(x) / d and zero for |x| < q_s:
  dx_q/dd = sign(x) (round(v) - v); dx_q/dq_m = sign(x) t (q_m - q_s)^(t-1) for |x| > q_m, else 0;
  dx_q/dt = sign(x) u(x) log(|x| - q_s) inside, sign(x) u log(q_m - q_s) above. dx_q/dx (not printed) is the
  mapping's own derivative t (|x| - q_s)^(t-1) inside [q_s, q_m], 0 outside, its base floored at q_s.
- In the loss the ceil of eq. 3-4 passes gradients straight through, so the bits are differentiable in
  q_m, t and d. The bits a policy records are eq. 3-4 rounded up to an integer, at least 1.
- After each step the parameters are projected: q_m > q_s, t >= 0.1, and d such that the grid keeps its top
  level (>= 2 bits for weights, >= 1 for activations) and at most 32 bits.

VIBNet gates (sec. 3.2), one per *channel group* (``autoprune.prune.channel_groups``), so the members of a
residual add share one gate and are pruned together:

- eq. 9-10: h_l = z_l * f_l(h_{l-1}), z = mu + eps sigma, eps ~ N(0, 1) drawn per sample and channel.
  f_l ends at the BatchNorm reading the layer's output where there is one (a gate before a BN would be
  normalised away), else at the layer itself. In evaluation z = mu with the pruned channels at zero.
- eq. 13: the VIB term sum_groups sum_i log(1 + mu_i^2 / sigma_i^2).
- eq. 18: channel i is pruned when alpha_i = mu_i^2 / sigma_i^2 < alpha_th; the pruned model is a smaller
  real model (``replay_structured`` of a ``StructuredRecord`` with method "djpq"); a group keeps at least
  its channel of largest alpha. After that the gates are *decided*: every channel left stays (z = mu).
- mu starts at 1 and log sigma^2 at ``init_log_sigma2`` = -4 (alpha = 55; the paper gives no value): from
  VIBNet's -9 (alpha = 8100) a few hundred steps cannot bring an unneeded channel below alpha_th = 1e-3.
- eq. 19 (soft, for the loss): 1 - p_l = mean_i sigmoid((log alpha_i - log alpha_th) / tau). The printed
  sigmoid((alpha - alpha_th) / tau) counts the channels *kept* (it is 1 for large alpha), and on the linear
  scale it is flat at the initial alpha ~ 1e4 >> alpha_th = 1e-3; on log alpha it has a gradient there.

BOPs (sec. 3.3) and the joint loss (sec. 3.4):

- eq. 15: MACs_l = MACs_l(float) x (1 - p_l) x (1 - p_{l-1}): the float model's MACs (``measure_cost``,
  traced once) scaled by the keep ratio of the group the layer writes and of the group it reads (1 for a
  layer outside any group); a depthwise conv reads the channels it writes and takes one ratio.
- eq. 16: BOPs_l = MACs_l x b_w,l x b_a,l-1, b_a,l-1 being the bits of what layer l reads.
- eq. 17: L = CE + gamma x VIB (eq. 13) + beta x sum_l BOPs_l, in absolute BOPs as the paper does.

Power-of-two bits (sec. 3.5, Alg. 2, ``pow2``): in the forward pass b' = ``autoprune.quant.pow2_bits`` of
eq. 3-4's bits (rounded down to 2, 4, 8, 16 or 32) and d' = (q_m - q_s)^t / (2^(b'-1) - 1) (weights) or
/ 2^b' (activations), with q_m kept; the backward pass is unchanged (gradients reach d).

Training (Alg. 1) uses Adam with the learning rate scaled per parameter kind (App. B.3). Alg. 1 anneals
gamma and beta per epoch without saying how; autoprune keeps them constant. ``learn_two_stage`` is the
baseline of sec. 4.2: VIBNet pruning alone, hard pruning, then the quantizers learned on the pruned model.
"""

from autoprune.djpq.gates import Gate, log_alpha, vib_term
from autoprune.djpq.learn import CurvePoint, DJPQConfig, DJPQResult, learn_policy, learn_two_stage, train_batches
from autoprune.djpq.net import DJPQModel, GateSpec, LayerSpec, Layout, build_layout
from autoprune.djpq.quantizer import LearnedQuantizer, NonlinearQuant, step_for_bits

__all__ = [
    "DJPQConfig", "DJPQResult", "CurvePoint", "learn_policy", "learn_two_stage", "train_batches",
    "DJPQModel", "Layout", "LayerSpec", "GateSpec", "build_layout",
    "Gate", "vib_term", "log_alpha", "LearnedQuantizer", "NonlinearQuant", "step_for_bits",
]
