"""Hugging Face BERT's self-attention converted into an ``Attention`` (issue 23): exact in float, masks included,
and its heads pruned whole (query / key / value reshaped into heads in BERT's forward: removed feature by feature,
every search trial failed)."""

from __future__ import annotations

import pytest
import torch

from autoprune.errors import AutopruneError
from autoprune.vision import import_torchvision

try:
    import_torchvision()  # transformers imports torchvision, which needs autoprune's op fallback on a CPU torch
except AutopruneError as exc:
    pytest.skip(str(exc), allow_module_level=True)
transformers = pytest.importorskip("transformers")

from autoprune.models.convert import EncoderAttention, converted  # noqa: E402
from autoprune.prune import prune_structured  # noqa: E402
from autoprune.prune.structured import searched_groups  # noqa: E402


def _bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32,
                                     max_position_embeddings=16)
    return transformers.BertModel(config, add_pooling_layer=False).eval()


IDS = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))


def test_bert_attention_is_converted_exactly_with_and_without_a_padding_mask() -> None:
    bert = _bert()
    model = converted(bert).eval()
    attention = model.encoder.layer[0].attention
    assert isinstance(attention, EncoderAttention) and attention.num_heads == 4 and bert.encoder.layer[0].attention is not attention
    padding = torch.ones(2, 8, dtype=torch.long)
    padding[1, 5:] = 0
    with torch.no_grad():
        for mask in (None, padding):
            expected = bert(input_ids=IDS, attention_mask=mask).last_hidden_state
            got = model(input_ids=IDS, attention_mask=mask).last_hidden_state
            assert torch.allclose(expected, got, atol=1e-5), (got - expected).abs().max()


def test_bert_heads_are_searched_and_pruned_whole() -> None:
    model = converted(_bert()).eval()
    groups = {g.name: g.channels for g in searched_groups(model, example_input=IDS.float())}
    assert groups.get("encoder.layer.0.attention.q_proj") == 4  # one keep ratio over 4 heads
    # 0.5 of 4 heads: 2 heads of 4 features, q / k / v rows and out_proj columns together
    prune_structured(model, keep={f"encoder.layer.0.attention.{proj}": 0.5 for proj in ("q_proj", "k_proj", "v_proj")}, example_input=IDS.float())
    attention = model.encoder.layer[0].attention
    assert (attention.num_heads, attention.q_proj.out_features, attention.v_proj.out_features, attention.out_proj.in_features) == (2, 8, 8, 8)
    assert model(input_ids=IDS).last_hidden_state.shape == (2, 8, 16)
