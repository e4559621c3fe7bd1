"""Attention and recurrent layers rewritten as equivalent modules of Linear layers and explicit products.

Compression, the cost model and the export all handle Conv / Linear layers; a layer that multiplies its weights
inside a fused kernel (``nn.MultiheadAttention``, ``nn.GRU``) hides those products from all three. Instead of
special-casing each layer everywhere, ``convert_model`` replaces it by a module computing the same function
(equal in float within rounding) whose every weight product is a Linear layer and whose every product of two
activations is a ``MatMul`` module:

- ``nn.MultiheadAttention`` -> ``Attention``: ``q_proj``, ``k_proj``, ``v_proj`` (the packed in-projection split
  in three, its bias with them), the ``qk`` and ``av`` products and ``out_proj``; the same call signature and
  outputs, so the encoder layers of PyTorch and torchvision call it unchanged (their fused fast path sees a
  module without a packed in-projection and takes the plain path).
- ``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` -> ``Recurrent``: per layer and direction an input Linear ``ih`` (all
  steps at once) and a hidden Linear ``hh`` (once per step), combined by PyTorch's gate formulas. Unrolled
  rather than quantizing the fused weight tensors in place because the hidden state is the input of a
  multiplication at every step: only an explicit ``hh`` lets an activation quantizer sit on it and lets the
  cost model see its T steps. The price is a Python loop over the steps, slower than the fused kernel and
  fine at the sequence lengths autoprune searches.

- timm's ``Attention`` (one packed ``qkv`` Linear reshaped into heads, then ``proj``) -> ``SelfAttention``, an
  ``Attention`` called as timm calls it; checked equal on a random input at conversion, refused by name if not.
- Hugging Face BERT's ``BertAttention`` (and its copies; encoders only) -> ``EncoderAttention``: ``query``,
  ``key``, ``value`` and ``output.dense`` as ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, its LayerNorm as
  ``norm``; checked equal on a random input at conversion, refused by name if not.
- Hugging Face's ``Conv1D`` (GPT-2's Linear with a transposed weight, applied by ``addmm``) -> ``nn.Linear``.

What cannot be converted is refused by name (``AutopruneError``): an LSTM with ``proj_size``, an attention
with ``add_bias_kv`` or ``add_zero_attn``, a packed sequence.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from autoprune.errors import AutopruneError


_OPAQUE: ContextVar[bool] = ContextVar("opaque", default=False)


@contextmanager
def opaque() -> Iterator[None]:
    """Within, a converted layer's output depends on its input through one autograd node: a graph tracer
    (Torch-Pruning) sees the layer as one op of fixed widths, not the reshapes and products inside it."""
    token = _OPAQUE.set(True)
    try:
        yield
    finally:
        _OPAQUE.reset(token)


class _Through(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None]:
        return None, None


def _opaque_call(forward: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    with torch.no_grad():
        out, rest = forward(x, *args, **kwargs)
    return _Through.apply(x, out), rest


class MatMul(nn.Module):
    """``a @ b`` between two activations: a site whose MACs the cost model counts and whose two inputs
    activation quantizers read (``input_quant`` for ``a``, ``input_quant_b`` for ``b``)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


class Attention(nn.Module):
    """Multi-head attention of separate q / k / v / out Linear layers and two ``MatMul`` products, called as
    ``nn.MultiheadAttention`` is (masks, ``need_weights``, ``batch_first``, unbatched inputs)."""

    # The fast paths of nn.TransformerEncoder(Layer) read these; without a packed in-projection they step aside.
    _qkv_same_embed_dim = False
    in_proj_weight = None
    in_proj_bias = None

    def __init__(self, *, embed_dim: int, num_heads: int, kdim: int | None = None, vdim: int | None = None,
                 bias: bool = True, dropout: float = 0.0, batch_first: bool = False) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise AutopruneError("num_heads", num_heads, f"must divide embed_dim {embed_dim}")
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.head_dim = embed_dim // num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias)
        self.qk = MatMul()
        self.av = MatMul()
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention, *, name: str = "") -> "Attention":
        if mha.bias_k is not None or mha.add_zero_attn:
            raise AutopruneError(f"model.{name}", "MultiheadAttention", "with add_bias_kv or add_zero_attn cannot be converted to Linear layers")
        bias = mha.in_proj_bias is not None
        attention = cls(embed_dim=mha.embed_dim, num_heads=mha.num_heads, kdim=mha.kdim, vdim=mha.vdim, bias=bias,
                        dropout=mha.dropout, batch_first=mha.batch_first)
        e = mha.embed_dim
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.detach().split(e)
        else:
            weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        biases = mha.in_proj_bias.detach().split(e) if bias else (None, None, None)
        with torch.no_grad():
            for proj, weight, b in zip((attention.q_proj, attention.k_proj, attention.v_proj), weights, biases):
                proj.weight.copy_(weight)
                if b is not None:
                    proj.bias.copy_(b)
            attention.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                attention.out_proj.bias.copy_(mha.out_proj.bias)
        return attention.to(mha.out_proj.weight.device, mha.out_proj.weight.dtype).train(mha.training)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                need_weights: bool = True, attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        arguments = (key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)
        return _opaque_call(self._attend, query, *arguments) if _OPAQUE.get() else self._attend(query, *arguments)

    @property
    def widths(self) -> tuple[int, int]:
        """Input and output features: what the layer fixes for its neighbours while its width is pinned."""
        return self.q_proj.in_features, self.out_proj.out_features

    def head_rows(self, heads: list[int]) -> list[int]:
        """The q / k / v output rows (and out_proj input columns) of these heads."""
        return [h * self.head_dim + i for h in heads for i in range(self.head_dim)]

    def keep_heads(self, heads: list[int]) -> None:
        """Remove every other head whole: its q / k / v rows and its out_proj columns (plain weights only)."""
        rows = torch.tensor(self.head_rows(heads), device=self.out_proj.weight.device)
        with torch.no_grad():
            for proj in (self.q_proj, self.k_proj, self.v_proj):
                proj.weight = nn.Parameter(proj.weight[rows].clone())
                if proj.bias is not None:
                    proj.bias = nn.Parameter(proj.bias[rows].clone())
                proj.out_features = len(rows)
            self.out_proj.weight = nn.Parameter(self.out_proj.weight[:, rows].clone())
            self.out_proj.in_features = len(rows)
        self.num_heads = len(heads)

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: torch.Tensor | None,
                need_weights: bool, attn_mask: torch.Tensor | None, average_attn_weights: bool,
                is_causal: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, length, _ = query.shape
        source = key.shape[1]
        heads = self.num_heads
        # q is scaled before its product, as nn.MultiheadAttention does
        q = (self.q_proj(query) * (1.0 / math.sqrt(self.head_dim))).view(n, length, heads, -1).transpose(1, 2)
        k = self.k_proj(key).view(n, source, heads, -1).transpose(1, 2)
        v = self.v_proj(value).view(n, source, heads, -1).transpose(1, 2)
        scores = self.qk(q, k.transpose(-2, -1))
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(length, source, dtype=torch.bool, device=scores.device).triu(1)
        for mask in (attn_mask, key_padding_mask.view(n, 1, 1, source) if key_padding_mask is not None else None):
            if mask is None:
                continue
            if mask.dim() == 3:  # (n * heads, L, S)
                mask = mask.view(n, heads, length, source)
            scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        weights = F.dropout(scores.softmax(dim=-1), p=self.dropout, training=self.training)
        out = self.av(weights, v).transpose(1, 2).reshape(n, length, -1)
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        shown = weights.mean(dim=1) if average_attn_weights else weights
        return out, shown if batched else shown.squeeze(0)


_GATES = {"GRU": 3, "LSTM": 4, "RNN_TANH": 1, "RNN_RELU": 1}


class Gates(nn.Module):
    """One layer and direction of a recurrent layer: the input and hidden products of every gate."""

    def __init__(self, input_size: int, hidden_size: int, gates: int, bias: bool) -> None:
        super().__init__()
        self.ih = nn.Linear(input_size, gates * hidden_size, bias=bias)
        self.hh = nn.Linear(hidden_size, gates * hidden_size, bias=bias)


class Recurrent(nn.Module):
    """``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` unrolled over the steps with Linear gates (``cells["l0"]``,
    ``cells["l0_reverse"]``, ...), called and answering as the layer it replaces."""

    def __init__(self, *, mode: str, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False) -> None:
        super().__init__()
        if mode not in _GATES:
            raise AutopruneError("mode", mode, f"must be one of {', '.join(_GATES)}")
        self.mode, self.hidden_size, self.num_layers = mode, hidden_size, num_layers
        self.batch_first, self.dropout, self.bidirectional = batch_first, dropout, bidirectional
        directions = ("", "_reverse") if bidirectional else ("",)
        self.cells = nn.ModuleDict({
            f"l{layer}{suffix}": Gates(input_size if layer == 0 else hidden_size * len(directions), hidden_size, _GATES[mode], bias)
            for layer in range(num_layers) for suffix in directions
        })

    @classmethod
    def from_module(cls, rnn: nn.RNNBase, *, name: str = "") -> "Recurrent":
        if getattr(rnn, "proj_size", 0):
            raise AutopruneError(f"model.{name}", "LSTM", "with proj_size cannot be converted to Linear layers")
        recurrent = cls(mode=rnn.mode, input_size=rnn.input_size, hidden_size=rnn.hidden_size, num_layers=rnn.num_layers,
                        bias=rnn.bias, batch_first=rnn.batch_first, dropout=rnn.dropout, bidirectional=rnn.bidirectional)
        with torch.no_grad():
            for key, cell in recurrent.cells.items():
                cell.ih.weight.copy_(getattr(rnn, f"weight_ih_{key}"))
                cell.hh.weight.copy_(getattr(rnn, f"weight_hh_{key}"))
                if rnn.bias:
                    cell.ih.bias.copy_(getattr(rnn, f"bias_ih_{key}"))
                    cell.hh.bias.copy_(getattr(rnn, f"bias_hh_{key}"))
        return recurrent.to(rnn.weight_ih_l0.device, rnn.weight_ih_l0.dtype).train(rnn.training)

    def _step(self, gx: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.mode == "GRU":
            xr, xz, xn = gx.chunk(3, dim=-1)
            hr, hz, hn = gh.chunk(3, dim=-1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            return (1 - z) * n + z * h, None
        if self.mode == "LSTM":
            i, f, g, o = (gx + gh).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
        pre = gx + gh
        return (torch.tanh(pre) if self.mode == "RNN_TANH" else torch.relu(pre)), None

    @property
    def widths(self) -> tuple[int, int]:
        """Input and output features: what the layer fixes for its neighbours while its width is pinned."""
        return self.cells["l0"].ih.in_features, self.hidden_size * (2 if self.bidirectional else 1)

    def forward(self, input: Any, hx: Any = None) -> tuple[torch.Tensor, Any]:
        return _opaque_call(self._run, input, hx) if _OPAQUE.get() and isinstance(input, torch.Tensor) else self._run(input, hx)

    def _run(self, input: Any, hx: Any = None) -> tuple[torch.Tensor, Any]:
        if isinstance(input, nn.utils.rnn.PackedSequence):
            raise AutopruneError("input", "PackedSequence", f"cannot go through a converted {self.mode}: pad the sequences instead")
        batched = input.dim() == 3
        # steps along dim 1, batch first: a Linear over all steps then counts T output positions per sample
        x = input if not batched or self.batch_first else input.transpose(0, 1)
        if not batched:
            x = x.unsqueeze(0)
        lstm = self.mode == "LSTM"
        h0, c0 = (hx if lstm else (hx, None)) if hx is not None else (None, None)
        directions = 2 if self.bidirectional else 1
        zeros = x.new_zeros(self.num_layers * directions, x.shape[0], self.hidden_size)
        h0 = zeros if h0 is None else (h0 if batched else h0.unsqueeze(1))
        c0 = (zeros if c0 is None else (c0 if batched else c0.unsqueeze(1))) if lstm else None
        last_h, last_c = [], []
        for layer in range(self.num_layers):
            outputs = []
            for d, suffix in enumerate(("", "_reverse")[:directions]):
                index = layer * directions + d
                cell = self.cells[f"l{layer}{suffix}"]
                gates_x = cell.ih(x)
                h, c = h0[index], c0[index] if lstm else None
                steps = range(x.shape[1] - 1, -1, -1) if suffix else range(x.shape[1])
                out: list[torch.Tensor] = [h] * x.shape[1]
                for t in steps:
                    h, c = self._step(gates_x[:, t], cell.hh(h), h, c)
                    out[t] = h
                outputs.append(torch.stack(out, dim=1))
                last_h.append(h)
                if lstm:
                    last_c.append(c)
            x = torch.cat(outputs, dim=-1) if directions > 1 else outputs[0]
            if layer < self.num_layers - 1:
                x = F.dropout(x, p=self.dropout, training=self.training)
        h_n = torch.stack(last_h)
        c_n = torch.stack(last_c) if lstm else None
        if not batched:
            x, h_n = x.squeeze(0), h_n.squeeze(1)
            c_n = c_n.squeeze(1) if c_n is not None else None
        elif not self.batch_first:
            x = x.transpose(0, 1)
        return x, ((h_n, c_n) if lstm else h_n)


class SelfAttention(Attention):
    """A fused-qkv self-attention (timm's ``Attention``: one Linear ``qkv`` writing q, k and v of every head,
    read by a reshape into heads, then ``proj``) as an ``Attention``, called as timm calls it: ``forward(x,
    attn_mask=None, is_causal=False)`` returning the output alone. Split so that heads prune whole: pruned
    as one Linear, ``qkv``'s rows would no longer reshape into three equal sets of heads."""

    @classmethod
    def from_fused(cls, module: nn.Module, *, name: str = "") -> "SelfAttention":
        qkv, proj = module.qkv, module.proj
        attention = cls(embed_dim=qkv.in_features, num_heads=module.num_heads, bias=qkv.bias is not None,
                        dropout=getattr(getattr(module, "attn_drop", None), "p", 0.0), batch_first=True)
        # timm's qkv and proj take their biases apart (qkv_bias=False, proj_bias=True by default)
        attention.out_proj = nn.Linear(proj.in_features, proj.out_features, bias=proj.bias is not None)
        with torch.no_grad():
            for proj_i, weight in zip((attention.q_proj, attention.k_proj, attention.v_proj), qkv.weight.detach().split(qkv.in_features)):
                proj_i.weight.copy_(weight)
            if qkv.bias is not None:
                for proj_i, b in zip((attention.q_proj, attention.k_proj, attention.v_proj), qkv.bias.detach().split(qkv.in_features)):
                    proj_i.bias.copy_(b)
            attention.out_proj.weight.copy_(proj.weight)
            if proj.bias is not None:
                attention.out_proj.bias.copy_(proj.bias)
        attention = attention.to(qkv.weight.device, qkv.weight.dtype).train(module.training)
        _check_equal(module, attention, name=name, width=qkv.in_features)
        return attention

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:  # type: ignore[override]
        # scaled_dot_product_attention's boolean mask says which positions take part; nn.MultiheadAttention's which do not
        mask = ~attn_mask if attn_mask is not None and attn_mask.dtype == torch.bool else attn_mask
        return super().forward(x, x, x, need_weights=False, attn_mask=mask, is_causal=is_causal)[0]


def _fused_qkv(module: nn.Module) -> bool:
    """A self-attention of one packed ``qkv`` Linear (3 x dim rows, every head's q, k, v) and a ``proj``
    Linear, nothing else weighted in between (no q / k norm, no gate): timm's ``Attention`` and its copies."""
    qkv, proj, heads = getattr(module, "qkv", None), getattr(module, "proj", None), getattr(module, "num_heads", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(heads, int) and heads > 0):
        return False
    passive = all(isinstance(getattr(module, attr, None), (nn.Identity, type(None))) for attr in ("q_norm", "k_norm", "norm", "gate"))
    return passive and qkv.out_features == 3 * qkv.in_features == 3 * proj.in_features and qkv.in_features % heads == 0


_NOT_PLAIN = "has a packed qkv Linear but does not compute plain self-attention: it cannot be split into heads (convert it to nn.MultiheadAttention)"


def _check_equal(original: nn.Module, attention: nn.Module, *, name: str, width: int, pairs: bool = False, why: str = _NOT_PLAIN) -> None:
    """A module converted by its shape alone must compute what it did: refused by name where it does not.
    ``pairs``: both return ``(output, weights)``, as Hugging Face's attention blocks do."""
    x = torch.randn(2, 5, width, generator=torch.Generator().manual_seed(0)).to(attention.out_proj.weight)
    modes = (original.training, attention.training)
    original.eval(), attention.eval()
    try:
        with torch.no_grad():
            expected, got = original(x), attention(x)
        if pairs:
            expected, got = expected[0], got[0]
        equal = isinstance(expected, torch.Tensor) and expected.shape == got.shape and torch.allclose(expected, got, rtol=1e-4, atol=1e-5)
    except Exception:  # noqa: BLE001 - a module that cannot be called on tokens alone is no plain self-attention
        equal = False
    finally:
        original.train(modes[0]), attention.train(modes[1])
    if not equal:
        raise AutopruneError(f"model.{name}", type(original).__name__, why)


class EncoderAttention(Attention):
    """Hugging Face BERT's ``BertAttention`` (and its copies: RoBERTa, ELECTRA, ...): a self-attention of separate
    ``query`` / ``key`` / ``value`` Linear layers viewed into heads, then ``output``: ``dense``, dropout and a
    LayerNorm of the sum with the input. As an ``Attention`` (``dense`` its ``out_proj``) called as BERT's layer
    calls it, returning ``(output, None)``: its heads prune whole where Torch-Pruning would remove q / k / v
    features one by one."""

    @classmethod
    def from_bert(cls, module: nn.Module, *, name: str = "") -> "EncoderAttention":
        inner, output = module.self, module.output
        attention = cls(embed_dim=inner.query.in_features, num_heads=inner.num_attention_heads, bias=inner.query.bias is not None,
                        dropout=inner.dropout.p, batch_first=True)
        attention.out_proj = nn.Linear(output.dense.in_features, output.dense.out_features, bias=output.dense.bias is not None)
        with torch.no_grad():
            for mine, theirs in ((attention.q_proj, inner.query), (attention.k_proj, inner.key), (attention.v_proj, inner.value),
                                 (attention.out_proj, output.dense)):
                mine.weight.copy_(theirs.weight)
                if theirs.bias is not None:
                    mine.bias.copy_(theirs.bias)
        attention.out_dropout, attention.norm = output.dropout, output.LayerNorm
        attention = attention.to(inner.query.weight.device, inner.query.weight.dtype).train(module.training)
        _check_equal(module, attention, name=name, width=inner.query.in_features, pairs=True,
                     why="looks like BERT's self-attention but does not compute it: it cannot be converted")
        return attention

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,  # type: ignore[override]
                encoder_hidden_states: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None,
                past_key_values: Any = None, **_kwargs: Any) -> tuple[torch.Tensor, None]:
        if encoder_hidden_states is not None or past_key_values is not None:
            raise AutopruneError("model", type(self).__name__, "a converted BERT attention takes no encoder states or key/value cache (encoders only)")
        # Hugging Face's boolean masks say which positions take part (sdpa); nn.MultiheadAttention's which do not
        mask = ~attention_mask if attention_mask is not None and attention_mask.dtype == torch.bool else attention_mask
        attended = super().forward(hidden_states, hidden_states, hidden_states, need_weights=False, attn_mask=mask)[0]
        return self.norm(self.out_dropout(attended) + hidden_states), None


def _bert_attention(module: nn.Module) -> bool:
    """BERT's self-attention block (not cross-attention, not a causal decoder's): ``self`` with query / key /
    value Linear layers of equal widths, ``output`` with ``dense``, ``dropout`` and ``LayerNorm``."""
    inner, output = getattr(module, "self", None), getattr(module, "output", None)
    if inner is None or output is None or getattr(module, "is_cross_attention", True) or getattr(inner, "is_causal", True) \
            or getattr(inner, "is_decoder", True):
        return False
    layers = [getattr(inner, attr, None) for attr in ("query", "key", "value")] + [getattr(output, "dense", None)]
    heads = getattr(inner, "num_attention_heads", None)
    return all(isinstance(layer, nn.Linear) and layer.in_features == layer.out_features == layers[0].in_features for layer in layers) \
        and isinstance(heads, int) and heads > 0 and layers[0].in_features % heads == 0 and isinstance(getattr(output, "LayerNorm", None), nn.LayerNorm) \
        and isinstance(getattr(inner, "dropout", None), nn.Dropout) and isinstance(getattr(output, "dropout", None), nn.Dropout)


def _transposed_linear(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a Linear whose weight is stored transposed (in x out), applied by addmm."""
    return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int) and isinstance(getattr(module, "nx", None), int) \
        and tuple(module.weight.shape) == (module.nx, module.nf)


def linear_from_transposed(module: nn.Module) -> nn.Linear:
    """The nn.Linear computing a transposed-weight linear layer (``x @ W + b`` with W of in x out)."""
    linear = nn.Linear(module.nx, module.nf, bias=module.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(module.weight.detach().t())
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    return linear.to(module.weight.device, module.weight.dtype).train(module.training)


CONVERTIBLE = (nn.MultiheadAttention, nn.RNNBase)
CONVERTED = (Attention, Recurrent)


def convertible(module: nn.Module) -> bool:
    """A layer ``convert_module`` rewrites: attention, recurrent, a fused-qkv attention, a transposed Linear."""
    return isinstance(module, CONVERTIBLE) or _fused_qkv(module) or _bert_attention(module) or _transposed_linear(module)


def product_sites(model: nn.Module) -> dict[str, str | None]:
    """Every ``MatMul`` by module name, with the layer whose activation bits its two inputs take unless a
    policy names the product itself: an attention's products take its ``out_proj``'s (the one precision of
    the activations inside an attention: out_proj reads what ``av`` writes), a product elsewhere none."""
    owners = {f"{name}.{attr}" if name else attr: (f"{name}.out_proj" if name else "out_proj")
              for name, module in model.named_modules() if isinstance(module, Attention) for attr in ("qk", "av")}
    return {name: owners.get(name) for name, module in model.named_modules() if isinstance(module, MatMul)}


def convert_module(module: nn.Module, *, name: str = "") -> nn.Module:
    """The equivalent module of Linear layers for one convertible module."""
    if isinstance(module, nn.MultiheadAttention):
        return Attention.from_module(module, name=name)
    if isinstance(module, nn.RNNBase):
        return Recurrent.from_module(module, name=name)
    if _fused_qkv(module):
        return SelfAttention.from_fused(module, name=name)
    if _bert_attention(module):
        return EncoderAttention.from_bert(module, name=name)
    if _transposed_linear(module):
        return linear_from_transposed(module)
    raise AutopruneError(f"model.{name}", type(module).__name__, "has no Linear-layer equivalent")


def needs_conversion(model: nn.Module) -> bool:
    return any(convertible(m) for m in model.modules())


def converted(model: nn.Module) -> nn.Module:
    """``model`` itself, or a converted copy where it holds attention or recurrent layers (the caller's
    model is never changed)."""
    import copy

    return convert_model(copy.deepcopy(model)) if needs_conversion(model) else model


def convert_model(model: nn.Module) -> nn.Module:
    """Replace, in place, every ``nn.MultiheadAttention`` / GRU / LSTM / RNN, fused-qkv attention and
    transposed Linear by its Linear-layer equivalent (same name, so ``encoder.attn`` becomes ``encoder.attn``
    with ``q_proj`` ... children); returns ``model``."""
    if convertible(model):
        return convert_module(model)
    for name, module in list(model.named_modules()):
        if convertible(module):
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            setattr(owner, attr, convert_module(module, name=name))
    return model

