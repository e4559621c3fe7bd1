"""Layers of timm and Hugging Face converted to autoprune's: timm's fused-qkv ``Attention`` (one Linear writing
every head's q, k and v, reshaped into heads) becomes an ``Attention`` whose heads prune whole; GPT-2's ``Conv1D``
(a Linear with its weight stored transposed) becomes an nn.Linear; an exported model whose cloned layers hold
equal weights keeps one initializer per layer. The timm and Hugging Face classes are copied here as they are
written (the libraries are not needed)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from autoprune.errors import AutopruneError
from autoprune.models.convert import SelfAttention, convert_model


class TimmAttention(nn.Module):
    """timm.layers.attention.Attention (1.0), without its q / k norms and gate."""

    def __init__(self, dim: int, num_heads: int, *, scale: float | None = None, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = scale or self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm, self.k_norm, self.norm = nn.Identity(), nn.Identity(), nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, **kwargs: float | bool) -> None:
        super().__init__()
        self.attn = TimmAttention(8, 2, **kwargs)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.attn(x).mean(1))


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_fused_qkv_attention_converts_to_heads_equal_in_float(qkv_bias: bool) -> None:
    torch.manual_seed(0)
    block = Block(qkv_bias=qkv_bias).eval()
    converted = convert_model(copy.deepcopy(block))
    assert isinstance(converted.attn, SelfAttention) and converted.attn.num_heads == 2
    x = torch.randn(3, 5, 8)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()  # scaled_dot_product_attention's mask: True takes part
    with torch.no_grad():
        assert torch.allclose(block(x), converted(x), atol=1e-5)
        assert torch.allclose(block.attn(x, attn_mask=causal), converted.attn(x, attn_mask=causal), atol=1e-5)
        assert torch.allclose(block.attn(x, is_causal=True), converted.attn(x, is_causal=True), atol=1e-5)


def test_fused_qkv_attention_that_computes_something_else_is_refused_by_name() -> None:
    with pytest.raises(AutopruneError, match="model.attn.*packed qkv Linear but does not compute plain self-attention"):
        convert_model(Block(scale=1.0))


def _task(model: nn.Module):
    import autoprune

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 5, 8, generator=g), torch.randint(0, 3, (64,), generator=g))
    return autoprune.Task.from_model(model, train=data, val=data, signal_steps=0)


def test_fused_qkv_attention_is_counted_and_pruned_by_whole_heads() -> None:
    import autoprune

    base = autoprune.cost(Block(), input_shape=(5, 8))
    # 5 tokens: q, k, v and proj 4 x 5 x 8 x 8, QK^T and AV 2 x 5 x 5 x 8, the head 8 x 3
    assert base.total.macs == 4 * 5 * 8 * 8 + 2 * 5 * 5 * 8 + 8 * 3
    policy = {"finetune_steps": 0, "layers": {"_default": {"keep_ratio": 0.5, "w_bits": 8, "a_bits": 8}}}
    result = autoprune.apply(Block(), policy, task=_task(Block()))
    assert result.model.attn.num_heads == 1 and result.model.attn.q_proj.weight.shape == (4, 8)
    assert result.cost((5, 8)).total.macs == 3 * 5 * 8 * 4 + 5 * 4 * 8 + 2 * 5 * 5 * 4 + 8 * 3


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D (GPT-2): x @ W + b with W stored in x out, applied by addmm."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(x.size()[:-1] + (self.nf,))


class Gpt2Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(16, 8), Conv1D(3, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x))).mean(1)


def test_transposed_linear_becomes_an_exact_linear_and_is_counted() -> None:
    import autoprune
    from autoprune.models import check_products

    torch.manual_seed(0)
    mlp = Gpt2Mlp()
    converted = convert_model(copy.deepcopy(mlp))
    assert type(converted.c_fc) is nn.Linear and converted.c_fc.weight.shape == (16, 8)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        assert torch.allclose(mlp(x), converted(x), atol=1e-6)
    with pytest.raises(AutopruneError, match="addmm"):
        check_products(mlp, input_shape=(5, 8))
    check_products(converted, input_shape=(5, 8))
    assert autoprune.cost(mlp, input_shape=(5, 8)).total.macs == 5 * 8 * 16 + 5 * 16 * 3


class Twins(nn.Module):
    """Two layers of equal weights (cloned, as nn.TransformerEncoder clones its layer): the ONNX exporter keeps
    one initializer for both."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        first = nn.Linear(8, 8)
        self.layers = nn.ModuleList([first, copy.deepcopy(first)])
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers[1](torch.relu(self.layers[0](x))).mean(1))


def test_layers_of_equal_weights_export_each_with_its_own_quantized_weight(tmp_path) -> None:
    import onnx

    import autoprune

    policy = {"finetune_steps": 0, "layers": {"_default": {"w_bits": 4, "a_bits": 8}, "layers.1": {"w_bits": 3}}}
    result = autoprune.apply(Twins(), policy, task=_task(Twins()), out=tmp_path / "twins.onnx")
    # fc runs on onnxruntime's integer kernel (QGemm), which rounds its int32 sums in its own order
    assert result.deployed.top1_agreement == 100.0 and result.deployed.max_abs_diff < 1e-2
    names = {init.name for init in onnx.load(str(tmp_path / "twins.onnx")).graph.initializer}
    assert {"layers.0.weight_quantized", "layers.1.weight_quantized"} <= names
