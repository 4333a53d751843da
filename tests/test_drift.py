"""Drift tests for the attention mirrors of diffusers `Attention`: what each mirror forms is what the processor used.

S-CFG never replaces a processor: `scfg.capture.default_attention`, `scfg.families.sd3_mmdit.
joint_image_query_attention` and `scfg.families.deepfloyd_if.joint_added_kv_attention` form the queries and keys
a processor uses (heads, norms, joint order, masks) from the layer's inputs. A diffusers release that changes a
processor would make such a mirror silently wrong, so each test here runs a real layer (a single `Attention`, or
the tiny SD3 transformer's forward) while a spy records what the processor hands its attention kernel
(`scaled_dot_product_attention`, or `get_attention_scores` and `torch.bmm` for the classic processors), and checks:

1. the spy is the processor's whole attention: per-head probabilities `softmax(q kᵀ · scale + mask)` formed in
   float64 from the spied tensors, times the spied values, through the processor's output projections, give the
   layer's recorded output;
2. the mirror's queries and keys are the spied ones, and its head-averaged probabilities (`AttentionRows.dense()`)
   are the head mean of those per-head probabilities, over the image queries (SD3: the first `Q` of the joint
   sequence; IF and plain `Attention`: all queries).

Models are float64, so the rounding bounds (derived beside each check from the tensors at hand) are of order 1e-14
to 1e-12, while a real change (a norm added or moved, another key order, another scale or mask convention) moves the
sharpened probabilities by 1e-2 or more; `test_drift_check_detects_...` shows that margin on changes of that kind.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import diffusers.models.attention_processor as attention_processor
import pytest
import torch
import torch.nn.functional as F
from bounds import softmax_rtol
from diffusers.models.attention_processor import (
    Attention,
    AttnAddedKVProcessor,
    AttnAddedKVProcessor2_0,
    AttnProcessor,
    AttnProcessor2_0,
    JointAttnProcessor2_0,
)

from scfg.capture import LayerCall, default_attention
from scfg.families.deepfloyd_if import joint_added_kv_attention
from scfg.families.sd3_mmdit import joint_image_query_attention

DTYPE = torch.float64
BATCH = 2
GRID = (3, 4)  # non-square image tokens of the single-module tests
TEXT_LEN = 5
SD3_LATENT = (8, 12)  # non-square latent: a 4x6 token grid with patch size 2
SD3_TEXT_LEN = 7
TINY = torch.finfo(DTYPE).tiny  # masked keys: exp underflows to exactly 0 on both sides, so only an absolute 0 is left


# ---------------------------------------------------------------------------------------------------------------------
# What the processor hands its attention kernel


@dataclass
class Seen:
    """One attention call inside the layer, per head: `query [B, H, Q, d]`, `key`/`value [B, H, K, d]`, `bias`
    broadcastable to `[B, H, Q, K]` (additive, or `None`) and the scale the kernel applied."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor | None
    bias: torch.Tensor | None
    scale: float


@dataclass
class Record:
    """One call of the layer: its inputs, its output, its projections' first outputs and its attention calls."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    output: object = None
    projections: dict = field(default_factory=dict)
    seen: list = field(default_factory=list)

    def call(self, projections: bool = False) -> LayerCall:
        """The layer's call as `AttentionCapture` hands it to a family function."""
        return LayerCall(self.args, self.kwargs, dict(self.projections) if projections else {})


def additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """An SDPA `attn_mask` as an additive bias (a boolean mask keeps the `True` keys)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, -math.inf)


@contextlib.contextmanager
def record_layer(attn: Attention, projections: tuple[str, ...] = ("to_q", "to_k")):
    """Record `attn`'s inputs, output and `projections` outputs, and spy on its attention kernel while it runs."""
    record = Record()
    active = [False]
    sdpa, bmm = F.scaled_dot_product_attention, torch.bmm
    scores = attn.get_attention_scores
    pending: list = []  # the classic processors: probabilities returned by `get_attention_scores`, awaiting `bmm`

    def sdpa_spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if active[0]:
            assert dropout_p == 0.0 and not is_causal and not kwargs, "the processor's SDPA call has changed"
            # torch's default scale, computed as torch computes it (not `d ** -0.5`: they can differ by an ulp)
            used = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
            record.seen.append(Seen(query, key, value, additive(attn_mask, query.dtype), used))
        return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)

    def scores_spy(query, key, attention_mask=None):
        probs = scores(query, key, attention_mask)
        if active[0]:
            heads = attn.heads
            batch = query.shape[0] // heads  # head_to_batch_dim: batch-major, heads minor

            def per_head(x):
                return None if x is None else x.view(batch, -1, *x.shape[1:])

            seen = Seen(per_head(query), per_head(key), None, per_head(attention_mask), float(attn.scale))
            pending.append((probs, seen))
            record.seen.append(seen)
        return probs

    def bmm_spy(left, right, *args, **kwargs):
        for probs, seen in pending:
            if left is probs:  # `torch.bmm(attention_probs, value)`
                seen.value = right.view(seen.key.shape[0], -1, *right.shape[1:])
        return bmm(left, right, *args, **kwargs)

    def start(module, args, kwargs):
        record.args, record.kwargs = args, kwargs
        active[0] = True

    def stop(module, args, output):
        active[0] = False
        record.output = output

    def keep(name):
        def hook(module, args, output):
            if active[0] and name not in record.projections:  # the first call is the processor's own
                record.projections[name] = output

        return hook

    # diffusers calls `F.scaled_dot_product_attention` through the `torch.nn.functional` module it imported as `F`
    assert attention_processor.F is F, "diffusers no longer calls torch.nn.functional's SDPA: update the spy"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(F, "scaled_dot_product_attention", sdpa_spy)
        patch.setattr(torch, "bmm", bmm_spy)
        patch.setattr(attn, "get_attention_scores", scores_spy)
        handles = [attn.register_forward_pre_hook(start, with_kwargs=True), attn.register_forward_hook(stop)]
        handles += [getattr(attn, name).register_forward_hook(keep(name)) for name in projections]
        try:
            yield record
        finally:
            for handle in handles:
                handle.remove()


def only_seen(record: Record) -> Seen:
    assert len(record.seen) == 1, f"expected one attention call in the layer, but got {len(record.seen)}"
    seen = record.seen[0]
    assert seen.value is not None, "the classic processor's `bmm(probs, value)` was not seen"
    return seen


# ---------------------------------------------------------------------------------------------------------------------
# The reference: per-head probabilities from the spied tensors, and the processor's tail after its attention


def reference_probs(seen: Seen) -> torch.Tensor:
    """Per-head `softmax(q kᵀ · scale + bias)` `[B, H, Q, K]` in float64, the scale on the scores."""
    scores = torch.matmul(seen.query.to(DTYPE), seen.key.to(DTYPE).transpose(-1, -2)) * seen.scale
    if seen.bias is not None:
        scores = scores + seen.bias.to(DTYPE)
    return scores.softmax(dim=-1)


def finish_attn(attn, attention, record):
    """The end of `AttnProcessor2_0` / `AttnProcessor`: heads merged, `to_out`, 4-D restored, residual, rescale."""
    hidden_states = record.kwargs.get("hidden_states", record.args[0] if record.args else None)
    out = attention.transpose(1, 2).flatten(2)
    out = attn.to_out[1](attn.to_out[0](out))
    if hidden_states.ndim == 4:
        out = out.transpose(-1, -2).reshape(hidden_states.shape)
    if attn.residual_connection:
        out = out + hidden_states
    return out / attn.rescale_output_factor


def finish_added_kv(attn, attention, record):
    """The end of `AttnAddedKVProcessor(2_0)`: heads merged, `to_out`, back to `[B, C, H, W]`, residual."""
    hidden_states = record.kwargs.get("hidden_states", record.args[0] if record.args else None)
    out = attn.to_out[1](attn.to_out[0](attention.transpose(1, 2).flatten(2)))
    return out.transpose(-1, -2).reshape(hidden_states.shape) + hidden_states


def finish_joint(attn, attention, record):
    """The end of `JointAttnProcessor2_0`: heads merged, split `[image; text]`, `to_out` and `to_add_out`."""
    num_image = record.kwargs["hidden_states"].shape[1]
    out = attention.transpose(1, 2).flatten(2)
    image, text = out[:, :num_image], out[:, num_image:]
    if not attn.context_pre_only:
        text = attn.to_add_out(text)
    return attn.to_out[1](attn.to_out[0](image)), text


TAILS = {
    AttnProcessor2_0: finish_attn,
    AttnProcessor: finish_attn,
    AttnAddedKVProcessor2_0: finish_added_kv,
    AttnAddedKVProcessor: finish_added_kv,
    JointAttnProcessor2_0: finish_joint,
}


def output_atol(attn, seen: Seen, attention: torch.Tensor, output: torch.Tensor) -> float:
    """Absolute bound on rebuilt-minus-recorded layer output, with `u = eps / 2`:

    - probabilities: the processor's kernel and `reference_probs` share q, k and the bias, so they differ by the
      relative `softmax_rtol` of tests/bounds.py, counted twice: SDPA's math applies √scale to q and to k (one more
      rounding than the bound's scale) and its online softmax rescales once more per key block; each is at most
      one more rounding of the terms the bound already counts;
    - `p @ v`, a `K`-term sum whose weights sum to 1: `(r + 2 K u) · max|v|` (r above, `K u` per side);
    - each output projection `W a + b` (`C` inputs): `‖W‖∞` times that, plus `(C + 1) u (|W| |a| + |b|)` per side;
    - the residual add and the division by `rescale_output_factor`: one rounding of the output per side each.
    """
    u = torch.finfo(DTYPE).eps / 2
    probs_rtol = 2 * softmax_rtol(seen.query.to(DTYPE), seen.key.to(DTYPE), seen.scale)
    delta = (probs_rtol + 2 * seen.key.shape[2] * u) * float(seen.value.abs().amax())
    merged = attention.transpose(1, 2).flatten(2).abs()
    linears = [attn.to_out[0]] + ([attn.to_add_out] if getattr(attn, "to_add_out", None) is not None else [])
    bound = 0.0
    for linear in linears:
        weight = linear.weight.detach().abs()
        magnitude = merged @ weight.T + (0 if linear.bias is None else linear.bias.detach().abs())
        channels = weight.shape[1]
        bound = max(bound, float(weight.sum(1).amax()) * delta + 2 * (channels + 1) * u * float(magnitude.amax()))
    return bound + 4 * u * float(output.abs().amax())


def assert_spy_rebuilds_output(attn, record: Record) -> torch.Tensor:
    """Check 1; returns the per-head reference probabilities `[B, H, Q, K]`."""
    seen = only_seen(record)
    probs = reference_probs(seen)
    attention = probs @ seen.value.to(DTYPE)
    rebuilt = TAILS[type(attn.processor)](attn, attention, record)
    outputs = record.output if isinstance(record.output, tuple) else (record.output,)
    rebuilt = rebuilt if isinstance(rebuilt, tuple) else (rebuilt,)
    assert len(rebuilt) == len(outputs)
    for mine, theirs in zip(rebuilt, outputs, strict=True):
        assert mine.shape == theirs.shape
        torch.testing.assert_close(mine, theirs, rtol=0, atol=output_atol(attn, seen, attention, theirs))
    return probs


def probs_rtol(rows, seen: Seen) -> float:
    """`softmax_rtol` for the mirror against `reference_probs` over the same q and k, plus what a scale differing
    in its last bits adds (`attn.scale` is `d ** -0.5`, SDPA's default `1 / sqrt(d)`): a relative difference `δ`
    of the scale moves each logit by `δ S` and each exponent after the max subtraction by `2 δ S`."""
    s = float((seen.query.abs() @ seen.key.abs().transpose(-1, -2)).amax()) * seen.scale
    return softmax_rtol(seen.query, seen.key, seen.scale) + 2 * abs(rows.scale / seen.scale - 1) * s


def assert_mirror_matches(rows, record: Record, probs: torch.Tensor) -> None:
    """Check 2: the mirror's q and k are the spied ones (the image queries), its probabilities their softmax."""
    seen = only_seen(record)
    num_queries = rows.shape[1]
    assert rows.shape == (probs.shape[0], num_queries, probs.shape[3])
    assert torch.equal(rows.query, seen.query[:, :, :num_queries])  # image queries first (SD3); all otherwise
    assert torch.equal(rows.key, seen.key)
    expected = probs[:, :, :num_queries].mean(dim=1)
    torch.testing.assert_close(rows.dense(), expected, rtol=probs_rtol(rows, seen), atol=TINY)


# ---------------------------------------------------------------------------------------------------------------------
# default_attention: `Attention` with `AttnProcessor2_0` and `AttnProcessor`


def sharpened(attn: Attention) -> Attention:
    """float64, eval, query/key weights scaled so that random attention has clear winners (random init is nearly
    uniform, which would hide a wrong scale or key order)."""
    attn = attn.to(DTYPE).eval()
    with torch.no_grad():
        for name in ("to_q", "to_k", "add_k_proj"):
            if getattr(attn, name, None) is not None:
                getattr(attn, name).weight.mul_(4.0)
    return attn


def text_bias(batch: int, keys: int) -> torch.Tensor:
    """A `[B, 1, T]` additive mask as `UNet2DConditionModel` and PixArt pass it: `(1 - mask) · -10000`, sample 0
    with its last two tokens padded."""
    mask = torch.ones(batch, keys, dtype=DTYPE)
    mask[0, -2:] = 0
    return ((1 - mask) * -10000.0)[:, None, :]


ATTN_CONFIGS = {
    # (Attention kwargs, 4-D input, cross-attention, mask)
    "self": (dict(), False, False, False),
    "cross_masked": (dict(cross_attention_dim=6, cross_attention_norm="layer_norm"), False, True, True),
    "self_masked": (dict(), False, False, True),
    "qk_layer_norm": (dict(cross_attention_dim=6, qk_norm="layer_norm"), False, True, False),
    "qk_rms_norm": (dict(qk_norm="rms_norm"), False, False, False),
    "group_norm": (dict(norm_num_groups=2, residual_connection=True, rescale_output_factor=2.0), True, False, False),
}


def attention_module(config: str, processor) -> tuple[Attention, tuple]:
    kwargs, four_d, cross, masked = ATTN_CONFIGS[config]
    torch.manual_seed(0)
    attn = sharpened(Attention(query_dim=8, heads=2, dim_head=4, bias=True, **kwargs))
    with torch.no_grad():  # a qk norm's affine weights away from 1, so that dropping them shows
        for norm in (attn.norm_q, attn.norm_k):
            if norm is not None and getattr(norm, "weight", None) is not None:
                norm.weight.copy_(torch.rand_like(norm.weight) + 0.5)
    attn.set_processor(processor)
    generator = torch.Generator().manual_seed(1)
    h, w = GRID
    shape = (BATCH, 8, h, w) if four_d else (BATCH, h * w, 8)
    hidden = torch.randn(*shape, generator=generator, dtype=DTYPE)
    context = torch.randn(BATCH, TEXT_LEN, 6, generator=generator, dtype=DTYPE) if cross else None
    keys = TEXT_LEN if cross else h * w
    mask = text_bias(BATCH, keys) if masked else None
    return attn, (hidden, context, mask)


ATTN_CASES = [
    pytest.param(
        processor,
        config,
        id=f"{processor.__name__}-{config}",
    )
    for processor in (AttnProcessor2_0, AttnProcessor)
    for config in ATTN_CONFIGS
]


@pytest.mark.parametrize("reuse", [False, True], ids=["recomputed", "recorded_projections"])
@pytest.mark.parametrize(("processor", "config"), ATTN_CASES)
def test_default_attention_matches_attn_processor(processor, config, reuse):
    attn, (hidden, context, mask) = attention_module(config, processor())
    with record_layer(attn) as record, torch.no_grad():
        attn(hidden, encoder_hidden_states=context, attention_mask=mask)
    assert set(record.projections) == {"to_q", "to_k"}  # what `AttentionCapture` keeps for the recorded path
    with torch.no_grad():
        probs = assert_spy_rebuilds_output(attn, record)
        rows = default_attention(attn, record.call(projections=reuse))
    assert_mirror_matches(rows, record, probs)


# ---------------------------------------------------------------------------------------------------------------------
# joint_image_query_attention: the SD3 / SD3.5 MMDiT, `JointAttnProcessor2_0`


@pytest.fixture(scope="module", params=[None, "rms_norm"], ids=["sd3", "sd3.5_qk_norm"])
def sd3_transformer(request):
    """A tiny SD3 transformer in float64 (the config of tests/conftest.py `build_tiny_sd3`); SD3.5 adds
    `qk_norm="rms_norm"` (RMS norms on image and text queries and keys)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=4,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        out_channels=4,
        qk_norm=request.param,
    ).to(DTYPE)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if name.endswith(("to_q.weight", "to_k.weight", "add_k_proj.weight")):
                param.mul_(4.0)
            elif ".norm_" in name and name.endswith(".weight"):  # RMS norm gains away from 1
                param.copy_(torch.rand_like(param) + 0.5)
    return transformer.eval()


def sd3_inputs(transformer) -> dict:
    config = transformer.config
    generator = torch.Generator().manual_seed(2)
    return dict(
        hidden_states=torch.randn(BATCH, config.in_channels, *SD3_LATENT, generator=generator, dtype=DTYPE),
        encoder_hidden_states=torch.randn(
            BATCH, SD3_TEXT_LEN, config.joint_attention_dim, generator=generator, dtype=DTYPE
        ),
        pooled_projections=torch.randn(BATCH, config.pooled_projection_dim, generator=generator, dtype=DTYPE),
        timestep=torch.tensor([700.0, 300.0], dtype=DTYPE),
        return_dict=False,
    )


# block 1: a middle block (the family's default layers); block 3: the last, `context_pre_only` (no `to_add_out`)
@pytest.mark.parametrize("block", [1, 3])
@pytest.mark.parametrize("reuse", [False, True], ids=["recomputed", "processor-projections"])
def test_joint_image_query_attention_matches_joint_attn_processor(sd3_transformer, block, reuse):
    attn = sd3_transformer.transformer_blocks[block].attn
    assert type(attn.processor) is JointAttnProcessor2_0
    if sd3_transformer.config.qk_norm:
        assert all(norm is not None for norm in (attn.norm_q, attn.norm_k, attn.norm_added_q, attn.norm_added_k))
    projections = ("to_q", "to_k", "add_k_proj") if reuse else ()  # the SD3 family reuses these
    with record_layer(attn, projections=projections) as record, torch.no_grad():
        sd3_transformer(**sd3_inputs(sd3_transformer))
    with torch.no_grad():
        probs = assert_spy_rebuilds_output(attn, record)
        rows = joint_image_query_attention(attn, record.call())
    num_image = math.prod(SD3_LATENT) // sd3_transformer.config.patch_size**2
    assert rows.shape == (BATCH, num_image, num_image + SD3_TEXT_LEN)  # image queries; keys [image; text]
    assert_mirror_matches(rows, record, probs)


def joint_module() -> tuple[Attention, torch.Tensor, torch.Tensor]:
    """A standalone SD3.5 joint attention (`JointTransformerBlock`'s `Attention` with `qk_norm="rms_norm"`) and its
    image and text inputs."""
    torch.manual_seed(0)
    attn = sharpened(
        Attention(
            query_dim=8,
            cross_attention_dim=None,
            added_kv_proj_dim=8,
            dim_head=4,
            heads=2,
            out_dim=8,
            context_pre_only=False,
            bias=True,
            processor=JointAttnProcessor2_0(),
            qk_norm="rms_norm",
            eps=1e-6,
        )
    )
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(BATCH, math.prod(GRID), 8, generator=generator, dtype=DTYPE)
    text = torch.randn(BATCH, TEXT_LEN, 8, generator=generator, dtype=DTYPE)
    return attn, hidden, text


def test_joint_image_query_attention_matches_joint_attn_processor_with_mask():
    """SD3 pipelines pass no mask to the joint attention; a caller's `joint_attention_kwargs` could."""
    attn, hidden, text = joint_module()
    mask = text_bias(BATCH, hidden.shape[1] + TEXT_LEN)  # [B, 1, Q + T]: sample 0's last two text keys masked
    with record_layer(attn, projections=()) as record, torch.no_grad():
        attn(hidden_states=hidden, encoder_hidden_states=text, attention_mask=mask)
    with torch.no_grad():
        probs = assert_spy_rebuilds_output(attn, record)
        rows = joint_image_query_attention(attn, record.call())
    assert_mirror_matches(rows, record, probs)


# ---------------------------------------------------------------------------------------------------------------------
# joint_added_kv_attention: DeepFloyd IF's `AttnAddedKVProcessor2_0` (and the classic `AttnAddedKVProcessor`)


def added_kv_module(processor, only_cross_attention: bool) -> Attention:
    """The added-KV attention of IF's UNet blocks (tests/test_pipeline_if.py's config). `upcast_softmax=False`: the
    classic processor's upcast is `.float()`, which would round a float64 model's softmax to float32."""
    torch.manual_seed(0)
    attn = Attention(
        query_dim=8,
        heads=2,
        dim_head=4,
        added_kv_proj_dim=6,
        norm_num_groups=4,
        out_bias=True,
        upcast_softmax=False,
        only_cross_attention=only_cross_attention,
        cross_attention_norm="group_norm",
        cross_attention_norm_num_groups=2,
        residual_connection=True,
        bias=True,
        processor=processor,
    )
    return sharpened(attn)


def added_kv_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(BATCH, 8, *GRID, generator=generator, dtype=DTYPE)  # [B, C, H, W] as the UNet passes it
    text = torch.randn(BATCH, TEXT_LEN, 6, generator=generator, dtype=DTYPE)
    return hidden, text


@pytest.mark.parametrize("only_cross", [False, True], ids=["joint", "only_cross"])
@pytest.mark.parametrize(
    "processor",
    [AttnAddedKVProcessor2_0, AttnAddedKVProcessor],
    ids=["AttnAddedKVProcessor2_0", "AttnAddedKVProcessor"],
)
def test_joint_added_kv_attention_matches_added_kv_processor(processor, only_cross):
    attn = added_kv_module(processor(), only_cross)
    hidden, text = added_kv_inputs()
    with record_layer(attn, projections=()) as record, torch.no_grad():
        attn(hidden, encoder_hidden_states=text)
    with torch.no_grad():
        probs = assert_spy_rebuilds_output(attn, record)
        rows = joint_added_kv_attention(attn, record.call())
    num_image = math.prod(GRID)
    assert rows.shape == (BATCH, num_image, TEXT_LEN + (0 if only_cross else num_image))  # keys [text; image]
    assert_mirror_matches(rows, record, probs)


def test_joint_added_kv_attention_matches_added_kv_processor_with_text_mask():
    """`UNet2DConditionModel` hands an `encoder_attention_mask` to IF's blocks as a `[B, 1, T]` bias; the processor
    pads it with `Q` zeros (image keys kept) to cover its `[text; image]` keys."""
    attn = added_kv_module(AttnAddedKVProcessor2_0(), False)
    hidden, text = added_kv_inputs()
    with record_layer(attn, projections=()) as record, torch.no_grad():
        attn(hidden, encoder_hidden_states=text, attention_mask=text_bias(BATCH, TEXT_LEN))
    with torch.no_grad():
        probs = assert_spy_rebuilds_output(attn, record)
        rows = joint_added_kv_attention(attn, record.call())
    assert_mirror_matches(rows, record, probs)


# ---------------------------------------------------------------------------------------------------------------------
# The checks are tight: changes of the kind a diffusers release could make fail them by orders of magnitude


def test_drift_check_detects_swapped_joint_order_and_missing_qk_norm(monkeypatch):
    """On SD3.5 (qk norm): a mirror with `[text; image]` keys, or without the q/k norms, is far outside the bound."""
    from scfg.attention import AttentionRows

    attn, hidden, text = joint_module()
    with record_layer(attn, projections=()) as record, torch.no_grad():
        attn(hidden_states=hidden, encoder_hidden_states=text)
    with torch.no_grad():
        probs = assert_spy_rebuilds_output(attn, record)
        rows = joint_image_query_attention(attn, record.call())
        assert_mirror_matches(rows, record, probs)  # the real mirror passes
        seen = only_seen(record)
        expected = probs[:, :, : rows.shape[1]].mean(dim=1)
        bound = probs_rtol(rows, seen) * float(expected.amax())
        num_image = rows.shape[1]
        swapped = torch.cat([rows.key[:, :, num_image:], rows.key[:, :, :num_image]], dim=2)
        text_first = AttentionRows(rows.query, swapped, rows.scale).dense()  # text columns read as image ones
        for name in ("norm_q", "norm_k", "norm_added_k"):
            monkeypatch.setattr(attn, name, None)
        unnormed = joint_image_query_attention(attn, record.call()).dense()
    # the bound is ~1e-14 and these drifts move probabilities by ~1e-1: a factor 1e6 says that the check would still
    # catch drifts a million times smaller than these
    for drifted in (text_first, unnormed):
        assert float((drifted - expected).abs().amax()) > 1e6 * bound
