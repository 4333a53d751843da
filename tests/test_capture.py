"""A single diffusers `Attention` module: capture matches a hand-written softmax and leaves the output alone."""

from __future__ import annotations

import pytest
import torch
from bounds import softmax_rtol
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from scfg import SCFGError
from scfg.capture import AttentionCapture, grid_for, level_grid


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = Attention(query_dim=8, heads=2, dim_head=4, cross_attention_dim=6)
        self.attn.set_processor(AttnProcessor2_0())

    def forward(self, x, context, mask=None):
        return self.attn(x, encoder_hidden_states=context, attention_mask=mask)


def projections(attn, x, context):
    b = x.shape[0]
    return attn.to_q(x).view(b, -1, 2, 4).transpose(1, 2), attn.to_k(context).view(b, -1, 2, 4).transpose(1, 2)


def manual_probs(attn, x, context, mask=None):
    q, k = projections(attn, x, context)
    scores = q @ k.transpose(-1, -2) / 2.0
    if mask is not None:
        scores = scores + (1 - mask[:, None, None, :]) * -10000.0
    return scores.softmax(-1).mean(1)


@pytest.mark.parametrize("with_mask", [False, True])
def test_capture_matches_manual_softmax_and_keeps_output(with_mask):
    holder = Holder()
    x, context = torch.randn(2, 12, 8), torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32) if with_mask else None
    bias = (1 - mask[:, None, :]) * -10000.0 if with_mask else None
    expected_out = holder(x, context, bias)
    with AttentionCapture(holder, ["attn"]) as capture:
        capture.begin((3, 4))
        out = holder(x, context, bias)
        captured = capture.finish()
    assert torch.equal(out, expected_out)  # the processor still computes the output
    assert captured is not None and captured.probs["attn"].shape == (2, 12, 5)
    # float32 is the point here (the capture's softmax of a float32 model): the two computations share q and k
    # bit for bit, so they differ only by the rounding of the scores and the softmax (tests/bounds.py); masked
    # keys are exactly 0 on both sides (exp underflows)
    q, k = projections(holder.attn, x, context)
    rtol = softmax_rtol(q, k, holder.attn.scale)
    expected = manual_probs(holder.attn, x, context, mask)
    torch.testing.assert_close(captured.probs["attn"], expected, rtol=rtol, atol=torch.finfo(torch.float32).tiny)
    assert isinstance(holder.attn.processor, AttnProcessor2_0)
    assert not holder.attn._forward_pre_hooks


def test_capture_records_only_between_begin_and_finish():
    holder = Holder()
    x, context = torch.randn(1, 12, 8), torch.randn(1, 5, 6)
    with AttentionCapture(holder, ["attn"]) as capture:
        holder(x, context)
        assert capture.current is None and capture.finish() is None
        capture.begin((3, 4))
        holder(x, context)
        assert set(capture.finish().probs) == {"attn"}
    assert capture.current is None


def test_capture_rejects_unknown_layers():
    with pytest.raises(SCFGError, match="unknown names"):
        AttentionCapture(Holder(), ["attn", "nope.attn2"])


def test_grid_for_ceil_divides_non_square_latents():
    assert grid_for(17 * 23, (17, 23)) == (17, 23)
    assert grid_for(9 * 12, (17, 23)) == (9, 12)
    assert grid_for(5 * 6, (17, 23)) == (5, 6)
    assert grid_for(5 * 7, (9, 13)) == (5, 7)
    assert level_grid((17, 23), 4) == (5, 6)
    with pytest.raises(SCFGError, match="17x23"):
        grid_for(50, (17, 23))


def count_calls(module: nn.Module) -> list:
    calls: list = []
    module.register_forward_hook(lambda *args: calls.append(1))
    return calls


@pytest.mark.parametrize("processor", ["sdpa", "classic", "fused"])
def test_capture_reuses_the_processors_own_projections(processor):
    from diffusers.models.attention_processor import AttnProcessor, FusedAttnProcessor2_0

    holder = Holder().double()
    if processor == "classic":
        holder.attn.set_processor(AttnProcessor())
    x, context = torch.randn(2, 12, 8, dtype=torch.float64), torch.randn(2, 5, 6, dtype=torch.float64)
    if processor == "fused":  # cross-attention keys come from to_kv, so to_k never runs: capture recomputes q/k
        holder.attn.fuse_projections()
        holder.attn.set_processor(FusedAttnProcessor2_0())
    q_calls, k_calls = count_calls(holder.attn.to_q), count_calls(holder.attn.to_k)
    expected_out = holder(x, context)
    assert (len(q_calls), len(k_calls)) == ((1, 0) if processor == "fused" else (1, 1))
    q_calls.clear()
    with AttentionCapture(holder, ["attn"]) as capture:
        capture.begin((3, 4))
        out = holder(x, context)
        captured = capture.finish()
    assert torch.equal(out, expected_out)
    # the capture adds no to_q forward when the processor's own q/k are there; it recomputes them otherwise
    assert len(q_calls) == (2 if processor == "fused" else 1)
    # float64, q and k shared bit for bit: the bound of tests/bounds.py (~1e-14 relative here)
    q, k = projections(holder.attn, x, context)
    rtol = softmax_rtol(q, k, holder.attn.scale)
    torch.testing.assert_close(captured.probs["attn"], manual_probs(holder.attn, x, context), rtol=rtol, atol=0)
    assert not holder.attn._forward_pre_hooks and not holder.attn._forward_hooks
    assert len(holder.attn.to_q._forward_hooks) == 1  # only count_calls' own hook is left


def test_capture_recomputes_when_the_processor_sees_part_of_the_batch():
    """Processors that run to_q on a slice of the batch (PAG's perturbed branch) fall back to recomputing."""

    class HalfBatchProcessor:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
            first, rest = hidden_states[:1], hidden_states[1:]
            out = AttnProcessor2_0()(attn, first, encoder_hidden_states[:1])
            return torch.cat(
                [out, attn.to_out[0](attn.to_v(encoder_hidden_states[1:]).mean(1, keepdim=True)).expand_as(rest)]
            )

    holder = Holder().double()
    holder.attn.set_processor(HalfBatchProcessor())
    x, context = torch.randn(2, 12, 8, dtype=torch.float64), torch.randn(2, 5, 6, dtype=torch.float64)
    with AttentionCapture(holder, ["attn"]) as capture:
        capture.begin((3, 4))
        holder(x, context)
        captured = capture.finish()
    assert captured.probs["attn"].shape == (2, 12, 5)
    # float64, q and k shared bit for bit: the bound of tests/bounds.py (~1e-14 relative here)
    q, k = projections(holder.attn, x, context)
    rtol = softmax_rtol(q, k, holder.attn.scale)
    torch.testing.assert_close(captured.probs["attn"], manual_probs(holder.attn, x, context), rtol=rtol, atol=0)
