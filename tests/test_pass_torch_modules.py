"""torch's own attention modules: Dynamo keeps them as one opaque call, which the pass lists as a dense site, with why.

``nn.MultiheadAttention`` reaches the graph as ``F.multi_head_attention_forward`` (training) or
``torch._native_multi_head_attention`` (its eval fast path), and ``nn.TransformerEncoderLayer`` in eval mode as
``torch._transformer_encoder_layer_fwd``: projections, masks and attention in one call. They used to be invisible (an
empty report); they must be listed, dense, and run exactly as before.
"""

from __future__ import annotations

import pytest
import torch

from moba_compile import explain


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_transformer_encoder_layer_is_listed_dense_with_the_reason(mode):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    getattr(layer, mode)()
    x = torch.randn(1, 8, 16)
    report = explain(layer, x, policy={"chunk_size": 2, "topk": 1, "dense_last": 0})
    assert len(report.sites) == 1
    site = report.sites[0]
    assert site.decision == "dense"
    assert "not rewritten, so dense" in site.reason
    assert ("multi_head_attention_forward" if mode == "train" else "_transformer_encoder_layer_fwd") in site.reason
    compiled = torch.compile(layer, backend="moba", options={"policy": {"chunk_size": 2, "topk": 1, "dense_last": 0}})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x))


def test_multihead_attention_module_is_listed_dense():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(1, 8, 16)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(8)
    report = explain(mha, x, x, x, need_weights=False, attn_mask=mask, is_causal=True, policy={"dense_last": 0})
    assert [(s.module, s.decision) for s in report.sites] == [("", "dense")]
    assert "torch.nn.MultiheadAttention" in report.sites[0].reason
