"""Attention: the Linear-layer equivalent of nn.MultiheadAttention is exact, and the cost counts the
projections (weight x activation) and the products QK^T and AV (activation x activation) wherever they are
written: in nn.MultiheadAttention, in a user's own forward or through F.scaled_dot_product_attention."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoprune.cost import LayerQuant, measure_cost
from autoprune.errors import AutopruneError
from autoprune.models.convert import Attention, convert_model


@pytest.mark.parametrize("batch_first", [True, False])
def test_converted_attention_equals_multihead_attention(batch_first: bool) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    converted = convert_model(copy.deepcopy(mha))
    assert isinstance(converted, Attention)
    x = torch.randn(3, 5, 8)  # (N, L, E) or (L, N, E)
    n = 3 if batch_first else 5
    padding = torch.zeros(n, x.shape[1 if batch_first else 0], dtype=torch.bool)
    padding[:, -1] = True
    causal = torch.ones(padding.shape[1], padding.shape[1], dtype=torch.bool).triu(1)
    for kwargs in ({}, {"key_padding_mask": padding}, {"attn_mask": causal, "need_weights": False}, {"average_attn_weights": False}):
        (out_a, w_a), (out_b, w_b) = mha(x, x, x, **kwargs), converted(x, x, x, **kwargs)
        assert torch.allclose(out_a, out_b, atol=1e-5)
        assert (w_a is None) == (w_b is None) and (w_a is None or torch.allclose(w_a, w_b, atol=1e-5))


def test_transformer_encoder_with_converted_attention_is_unchanged() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    converted = convert_model(copy.deepcopy(encoder))
    assert isinstance(converted.layers[0].self_attn, Attention)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():  # the fused fast path of the original against the plain path of the converted
        assert torch.allclose(encoder(x), converted(x), atol=1e-5)


def test_attention_with_bias_kv_is_refused_by_name() -> None:
    with pytest.raises(AutopruneError, match="model.attn.*add_bias_kv"):
        convert_model(nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2, add_bias_kv=True)}))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def test_multihead_attention_macs_and_product_bops_by_hand() -> None:
    # E = 8, 2 heads, L = 5 tokens: 4 projections of L x E x E, QK^T and AV of L x L x E each
    quant = {"attn.qk": LayerQuant(a_bits=4, w_bits=6), "attn.q_proj": LayerQuant(w_bits=4, a_bits=8)}
    report = measure_cost(_Block(), input_shape=(5, 8), layers=quant)
    rows = {layer.name: layer for layer in report.layers}
    assert list(rows) == ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.qk", "attn.av", "attn.out_proj"]
    assert [rows[f"attn.{p}_proj"].macs for p in "qkvo" if p != "o"] == [5 * 8 * 8] * 3
    assert rows["attn.qk"].macs == rows["attn.av"].macs == 5 * 5 * 8
    assert report.total.macs == 4 * 5 * 8 * 8 + 2 * 5 * 5 * 8
    assert rows["attn.qk"].kind == "product" and rows["attn.qk"].bops == 5 * 5 * 8 * 4 * 6
    assert rows["attn.av"].bops == 5 * 5 * 8 * 32 * 32
    assert rows["attn.q_proj"].a_bits == 32, "q_proj reads the network input: input_bits"
    assert {e.op: e.elements for e in report.elements} == {"softmax": 2 * 5 * 5}


class _Functional(nn.Module):
    """Attention written in a user's forward: einsum, @ and SDPA between activations."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = torch.einsum("bld,bmd->blm", q, k)
        mixed = scores.softmax(-1) @ v
        return mixed + F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)


def test_products_in_a_users_forward_are_counted_at_dispatch() -> None:
    report = measure_cost(_Functional(), input_shape=(5, 8))
    ops = {layer.name: layer.macs for layer in report.layers if layer.kind == "op"}
    # einsum and @ reach the dispatcher as bmm; SDPA as its fused kernel, counted as QK^T + AV
    assert ops == {"bmm": 5 * 5 * 8, "bmm.1": 5 * 5 * 8, "scaled_dot_product_attention": 2 * 5 * 5 * 8}
    assert report.total.macs == 5 * 8 * 24 + 4 * 5 * 5 * 8
    assert report.total.bops == 5 * 8 * 24 * 1024 + 4 * 5 * 5 * 8 * 1024


class _ViTB16(nn.Module):
    """torchvision's vit_b_16 of torch modules alone (the installed torchvision may not import): 16x16 patches,
    class token, positional embedding, 12 pre-norm encoder layers of 768 / 12 heads / 3072, the head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, 768, 16, stride=16)
        self.class_token = nn.Parameter(torch.zeros(1, 1, 768))
        self.pos_embedding = nn.Parameter(torch.zeros(1, 197, 768))
        layer = nn.TransformerEncoderLayer(768, 12, 3072, activation="gelu", norm_first=True, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 12, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(768)
        self.head = nn.Linear(768, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.conv_proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_token.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos_embedding
        return self.head(self.ln(self.encoder(tokens))[:, 0])


def _vit_b_16() -> nn.Module:
    """torchvision's vit_b_16, or where the installed torchvision does not import (one built for another
    torch fails with RuntimeError) its torch-module equivalent."""
    try:
        from torchvision.models import vit_b_16
    except Exception:  # noqa: BLE001
        return _ViTB16()
    return vit_b_16()


@pytest.mark.e2e
def test_vit_b_16_within_one_percent_of_torchvisions_published_figure() -> None:
    # ViT_B_16_Weights.IMAGENET1K_V1.meta["_ops"] = 17.564 (G multiply-adds, attention products included)
    report = measure_cost(_vit_b_16(), input_shape=(3, 224, 224))
    assert report.total.macs / 1e9 == pytest.approx(17.564, rel=0.01)
    assert report.uncounted == ()
    assert {e.name.rpartition(".")[2] for e in report.elements if e.op == "parameter"} == {"class_token", "pos_embedding"}


class _Tokens(nn.Module):
    """5 tokens of 8 features, one attention layer, the mean token into 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.attn(x, x, x, need_weights=False)[0].mean(dim=1))


def _token_task() -> "autoprune.Task":
    import autoprune
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 5, 8, generator=g), torch.randint(0, 3, (64,), generator=g))
    return autoprune.Task.from_model(_Tokens(), train=data, val=data, signal_steps=0)


def test_attention_compressed_with_bits_at_both_inputs_of_its_products() -> None:
    import autoprune
    from autoprune.quant import ACT_QUANT, SECOND_ACT_QUANT

    policy = {"finetune_steps": 0, "layers": {"_default": {"w_bits": 4, "a_bits": 4}, "attn.out_proj": {"w_bits": 4, "a_bits": 6}}}
    result = autoprune.apply(_Tokens(), policy, task=_token_task())
    attention = result.model.attn
    assert isinstance(attention, Attention)
    assert len(torch.unique(attention.k_proj.weight)) <= 16, "the split in-projection's k part is on a 4-bit grid"
    for product in (attention.qk, attention.av):
        first, second = getattr(product, ACT_QUANT), getattr(product, SECOND_ACT_QUANT)
        assert first.bits == second.bits == 6, "a product's inputs take the bits of the attention's out_proj"
        assert first.calibrated and second.calibrated
    rows = {layer.name: layer for layer in result.cost((5, 8)).layers}
    assert rows["attn.qk"].bops == 5 * 5 * 8 * 6 * 6
    assert rows["attn.k_proj"].bops == 5 * 8 * 8 * 4 * 8, "k_proj reads the network input (the policy's input_bits, 8)"


def test_weight_only_policy_keeps_activations_float_and_costs_them_at_16_bits() -> None:
    import autoprune
    from autoprune.quant import ACT_QUANT

    policy = {"finetune_steps": 0, "input_bits": 16, "layers": {"_default": {"w_bits": 8, "a_bits": 16}}}
    result = autoprune.apply(_Tokens(), policy, task=_token_task())
    assert not any(hasattr(m, ACT_QUANT) for m in result.model.modules()), "A16: no activation quantizer"
    rows = {layer.name: layer for layer in result.cost((5, 8)).layers}
    assert rows["fc"].bops == 8 * 3 * 8 * 16
    assert rows["attn.av"].bops == 5 * 5 * 8 * 16 * 16
    assert autoprune.Policy.from_dict(policy).summary() .endswith("_default:W8A16")


def test_compressed_attention_exports_to_onnx_in_agreement(tmp_path) -> None:
    import autoprune

    policy = {"finetune_steps": 0, "layers": {"_default": {"w_bits": 4, "a_bits": 8}}}
    result = autoprune.apply(_Tokens(), policy, task=_token_task(), out=tmp_path / "tokens.onnx")
    assert result.deployed.top1_agreement == 100.0 and result.deployed.max_abs_diff < 1e-4


def test_embedding_takes_weight_bits_only() -> None:
    from autoprune.compress import static_compress
    from autoprune.models import build_model
    from autoprune.policy import Policy

    model = build_model("mnist1d_transformer")
    policy = Policy.from_dict({"layers": {"_default": {"w_bits": 8, "a_bits": 8}, "position": {"w_bits": 3}}})
    result = static_compress(model, policy, input_shape=(1, 40))
    assert len(torch.unique(result.model.position.weight)) <= 8
    (row,) = [layer for layer in result.cost((1, 40)).layers if layer.name == "position"]
    assert (row.kind, row.w_bits, row.macs) == ("embedding", 3, 0)
    assert row.memory_mb == 40 * 32 * 3 / 1e6, "the table at 3 bits, no feature map read"
    with pytest.raises(AutopruneError, match="weight bits only"):
        static_compress(model, Policy.from_dict({"layers": {"position": {"keep_ratio": 0.5}}}), input_shape=(1, 40))


def test_shipped_weight_only_space_samples_w_a16_policies() -> None:
    from autoprune.search.space import SpaceSpec
    from autoprune.specs import shipped

    space = SpaceSpec.load(shipped("search_spaces", "weight_only")).bind(convert_model(_Tokens()), input_shape=(5, 8))
    dims = space.dimensions()
    assert not any(name.endswith("a_bits") for name in dims), "activation bits are fixed at 16"
    params = {name: (dim.choices[0] if dim.choices else dim.low) for name, dim in dims.items()}
    policy = space.policy(params)
    # the projections read the network input, at input_bits
    assert policy.layers["attn.out_proj"].a_bits == policy.layers["fc"].a_bits == policy.input_bits == 16
    assert "attn.out_proj:W2A16" in policy.summary(list(policy.layers))


def test_heads_are_pruned_whole_and_replayed_from_the_saved_record(tmp_path) -> None:
    import autoprune
    from autoprune.compress import load_compressed, save_compressed

    task = _token_task()
    # 2 heads of 4 at keep 0.5: one head whole, its q / k / v rows and its out_proj columns
    policy = {"finetune_steps": 0, "layers": {"_default": {"keep_ratio": 0.5, "w_bits": 8, "a_bits": 8}}}
    result = autoprune.apply(_Tokens(), policy, task=task)
    attention = result.model.attn
    assert attention.num_heads == 1
    assert attention.q_proj.weight.shape == attention.v_proj.weight.shape == (4, 8) and attention.out_proj.weight.shape == (8, 4)
    kept = result.structured.layers["attn.q_proj"].kept
    assert kept in ([0, 1, 2, 3], [4, 5, 6, 7]) and result.structured.layers["attn.k_proj"].kept == kept
    rows = {layer.name: layer for layer in result.cost((5, 8)).layers}
    assert rows["attn.qk"].macs == 5 * 5 * 4 and rows["attn.q_proj"].macs == 5 * 8 * 4
    loaded = load_compressed(save_compressed(result, tmp_path / "tokens.safetensors", task=task), task=task)
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        assert torch.equal(result.model(x), loaded.model(x))
    with pytest.raises(AutopruneError, match="share their heads"):
        autoprune.apply(_Tokens(), {"finetune_steps": 0, "layers": {"attn.q_proj": {"keep_ratio": 0.5}}}, task=task)


def test_the_default_space_samples_a_head_keep_ratio_that_prunes_whole_heads() -> None:
    import autoprune
    from autoprune.search.space import SpaceSpec
    from autoprune.specs import shipped

    space = SpaceSpec.load(shipped("search_spaces", "default")).bind(convert_model(_Tokens()), input_shape=(5, 8))
    name = "group:attn.q_proj.keep_ratio"
    assert name in space.dimensions(), "one keep ratio for the q / k / v of the attention's 2 heads"
    params = {n: (dim.choices[-1] if dim.choices else dim.high) for n, dim in space.dimensions().items()} | {name: 0.5}
    policy = space.policy(params)
    assert {policy.layers[f"attn.{p}_proj"].keep_ratio for p in "qkv"} == {0.5}
    result = autoprune.apply(_Tokens(), policy.to_dict() | {"finetune_steps": 0}, task=_token_task())
    assert result.model.attn.num_heads == 1 and result.model.attn.k_proj.weight.shape == (4, 8)
