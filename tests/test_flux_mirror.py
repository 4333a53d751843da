"""Drift tests for `scfg.families.flux_attention`: the mirror forms what FLUX's attention processor forms.

Each test runs a real forward of the tiny `FluxTransformer2DModel` (2 double-stream and 2 single-stream blocks, a
non-square 8x12 token grid, batch 2), records a layer's inputs and output with hooks, and rebuilds that output
from `flux_qkv`'s query, key and value the way the processor finishes its call. A diffusers release that changes
the processor's maths (order of norms, text position, rotary layout, scale, projections) fails here instead of
producing silently wrong attention maps.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from scfg.config import SCFGError
from scfg.families.flux_attention import SUPPORTED_PROCESSORS, flux_qkv, flux_scale

GRID = (8, 12)  # non-square, so a swapped (h, w) in the rotary positions cannot pass
TEXT_LEN = 7
BATCH = 2
INNER = 32  # the tiny transformer's width: 2 heads x 16
LAYERS = ("transformer_blocks.1.attn", "single_transformer_blocks.0.attn")
# What the processor's attention receives, by parameter name (FluxAttention.forward / Attention.forward order).
PARAMETERS = ("hidden_states", "encoder_hidden_states", "attention_mask", "image_rotary_emb")
# float32 throughout, and the mirror runs the processor's own ops in its order and layout, so query, key and value
# are bit-identical (`test_flux_qkv_is_what_the_attention_receives`). The rebuilt output can differ only through
# SDPA, which may pick another kernel or blocking for our tensors than for the processor's permuted views: sums of
# 103 float32 products of O(1) values reordered, about 1e-7 (torch 2.13 on CPU gives exactly 0). 1e-5 leaves a
# margin of 100 and still catches any real change: a missing norm, a wrong scale or text placed last moves the
# outputs of these sharpened layers by 1e-2 or more.
ATOL = 1e-5


@pytest.fixture
def transformer(tiny_flux_path):
    """A fresh transformer per test (tests fuse projections or swap processors), loaded like a checkpoint."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(str(tiny_flux_path), subfolder="transformer").eval()


def transformer_inputs(transformer) -> dict:
    """Inputs of one denoiser call as FluxPipeline makes them: packed latents, T5 states, CLIP pooled, positions."""
    config = transformer.config
    h, w = GRID
    generator = torch.Generator().manual_seed(0)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return dict(
        hidden_states=torch.randn(BATCH, h * w, config.in_channels, generator=generator),
        encoder_hidden_states=torch.randn(BATCH, TEXT_LEN, config.joint_attention_dim, generator=generator),
        pooled_projections=torch.randn(BATCH, config.pooled_projection_dim, generator=generator),
        timestep=torch.tensor([0.7, 0.3]),
        img_ids=img_ids.reshape(h * w, 3),
        txt_ids=torch.zeros(TEXT_LEN, 3),
        return_dict=False,
    )


def named_inputs(args: tuple, kwargs: dict) -> dict:
    named = dict(zip(PARAMETERS, args, strict=False))  # positional ones, if any
    named.update({name: kwargs[name] for name in PARAMETERS if name in kwargs})
    return {name: named.get(name) for name in PARAMETERS}


@contextlib.contextmanager
def record_layer(transformer, layer: str, linears: tuple[str, ...] = ()):
    """Record `layer`'s inputs (by name), its output, and the outputs of its `linears` during the forward."""
    attn = transformer.get_submodule(layer)
    record: dict = {"projections": {}}

    def pre_hook(module, args, kwargs):
        record["inputs"] = named_inputs(args, kwargs)

    def hook(module, args, output):
        record["output"] = output

    def linear_hook(name):
        def store(module, args, output):
            record["projections"][name] = output

        return store

    handles = [attn.register_forward_pre_hook(pre_hook, with_kwargs=True), attn.register_forward_hook(hook)]
    handles += [getattr(attn, name).register_forward_hook(linear_hook(name)) for name in linears]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


def rebuild_output(attn, query, key, value, encoder_hidden_states):
    """Finish the processor's call from the mirror's `[B, heads, N, head_dim]` query, key and value: attention,
    heads flattened, then (double-stream) text/image split and the two output projections; single-stream blocks
    are `pre_only` and return the attention as it is."""
    out = F.scaled_dot_product_attention(query, key, value, scale=flux_scale(attn))
    out = out.transpose(1, 2).flatten(2, 3)
    if encoder_hidden_states is None:
        return out
    text, image = out.split_with_sizes(
        [encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]], 1
    )
    return attn.to_out[1](attn.to_out[0](image)), attn.to_add_out(text)


def assert_outputs_close(rebuilt, output) -> None:
    rebuilt = rebuilt if isinstance(rebuilt, tuple) else (rebuilt,)
    output = output if isinstance(output, tuple) else (output,)
    assert len(output) >= len(rebuilt)  # the IP-Adapter processor adds its image-prompt attention as a 3rd output
    for mine, theirs in zip(rebuilt, output[: len(rebuilt)], strict=True):
        assert mine.shape == theirs.shape
        torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=0)


def mirror_and_rebuild(attn, inputs, **kwargs):
    assert inputs["attention_mask"] is None  # FluxPipeline passes none; the mirror leaves masks to the caller
    query, key, value = flux_qkv(
        attn,
        inputs["hidden_states"],
        inputs["encoder_hidden_states"],
        inputs["image_rotary_emb"],
        with_value=True,
        **kwargs,
    )
    return (query, key, value), rebuild_output(attn, query, key, value, inputs["encoder_hidden_states"])


def projection_names(attn) -> tuple[str, ...]:
    """The Linear modules the processor calls on this layer (what hooks must watch to record `projections`)."""
    if type(attn.processor).__name__ == "FusedFluxAttnProcessor2_0" or getattr(attn, "fused_projections", False):
        names = ("to_qkv", "to_added_qkv")
    else:
        names = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
    return tuple(name for name in names if getattr(attn, name, None) is not None)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("layer", LAYERS)
def test_flux_qkv_rebuilds_layer_output(transformer, layer, fused):
    if fused:
        transformer.fuse_qkv_projections()
    attn = transformer.get_submodule(layer)
    if fused:  # the fused path must really be the one the processor takes
        assert projection_names(attn)[0] == "to_qkv"
    with record_layer(transformer, layer) as record, torch.no_grad():
        transformer(**transformer_inputs(transformer))
        (query, key, _), rebuilt = mirror_and_rebuild(attn, record["inputs"])

    heads, head_dim = transformer.config.num_attention_heads, transformer.config.attention_head_dim
    assert query.shape == key.shape == (BATCH, heads, TEXT_LEN + GRID[0] * GRID[1], head_dim)
    assert flux_scale(attn) == pytest.approx(head_dim**-0.5)
    assert_outputs_close(rebuilt, record["output"])


@pytest.mark.parametrize("layer", LAYERS)
def test_flux_qkv_without_rotary_embedding(transformer, layer):
    attn = transformer.get_submodule(layer)
    with record_layer(transformer, layer) as record, torch.no_grad():
        transformer(**transformer_inputs(transformer))
        inputs = {**record["inputs"], "image_rotary_emb": None}
        output = attn(inputs["hidden_states"], inputs["encoder_hidden_states"], image_rotary_emb=None)
        _, rebuilt = mirror_and_rebuild(attn, inputs)
    assert_outputs_close(rebuilt, output)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("layer", LAYERS)
def test_flux_qkv_is_what_the_attention_receives(transformer, layer, fused, monkeypatch):
    """Stronger than the output check: spy on SDPA while the layer runs (the native backend on CPU calls it, as do
    the legacy processors) and require the mirror's query, key and value to be the very same numbers."""
    if fused:
        transformer.fuse_qkv_projections()
    attn = transformer.get_submodule(layer)
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):
        seen.append((query, key, value))
        return sdpa(query, key, value, *args, **kwargs)

    def start_spying(module, args, kwargs):
        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)

    def stop_spying(module, args, output):
        monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)

    handles = [
        attn.register_forward_pre_hook(start_spying, with_kwargs=True),
        attn.register_forward_hook(stop_spying),
    ]
    try:
        with record_layer(transformer, layer) as record, torch.no_grad():
            transformer(**transformer_inputs(transformer))
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        mirrored, _ = mirror_and_rebuild(attn, record["inputs"])
    assert len(seen) == 1, "expected one SDPA call in the layer; has the processor's attention backend changed?"
    for mine, theirs in zip(mirrored, seen[0], strict=True):
        assert mine.shape == theirs.shape
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("layer", LAYERS)
def test_flux_qkv_reuses_recorded_projections(transformer, layer, fused):
    if fused:
        transformer.fuse_qkv_projections()
    attn = transformer.get_submodule(layer)
    names = projection_names(attn)
    calls = []

    def count(module, args, output):
        calls.append(module)

    with record_layer(transformer, layer, names) as record, torch.no_grad():
        transformer(**transformer_inputs(transformer))
        assert set(record["projections"]) == set(names)  # the processor called exactly these
        recomputed, _ = mirror_and_rebuild(attn, record["inputs"])
        counters = [getattr(attn, name).register_forward_hook(count) for name in names]
        try:
            reused, rebuilt = mirror_and_rebuild(attn, record["inputs"], projections=record["projections"])
        finally:
            for handle in counters:
                handle.remove()
    assert not calls  # nothing projected again
    for mine, theirs in zip(reused, recomputed, strict=True):
        assert torch.equal(mine, theirs)  # the same Linear outputs, so the same bits
    assert_outputs_close(rebuilt, record["output"])


def test_flux_qkv_mirrors_joint_part_of_ip_adapter_processor(transformer):
    """The IP-Adapter processor's joint attention is FluxAttnProcessor's; its image-prompt attention is a separate
    third output, not part of the joint probabilities."""
    import diffusers.models.attention_processor as legacy
    import diffusers.models.transformers.transformer_flux as flux

    processor_class = getattr(flux, "FluxIPAdapterAttnProcessor", None) or legacy.FluxIPAdapterJointAttnProcessor2_0
    layer = LAYERS[0]  # diffusers puts IP-Adapter processors on the double-stream blocks only
    attn = transformer.get_submodule(layer)
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    with record_layer(transformer, layer) as record, torch.no_grad():
        transformer(**transformer_inputs(transformer))  # the layer's real inputs, with its default processor
    inputs = record["inputs"]
    torch.manual_seed(0)
    attn.set_processor(processor_class(hidden_size=dim, cross_attention_dim=dim, num_tokens=(4,)))
    ip_tokens = torch.randn(BATCH, 4, dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        output = attn(
            inputs["hidden_states"],
            inputs["encoder_hidden_states"],
            image_rotary_emb=inputs["image_rotary_emb"],
            ip_hidden_states=[ip_tokens],
        )
        _, rebuilt = mirror_and_rebuild(attn, inputs)
    assert len(output) == 3
    assert_outputs_close(rebuilt, output)


class RecordingProcessor:
    """A processor S-CFG does not know (say, another library's wrapper): the mirror cannot vouch for its maths."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, *args, **kwargs):
        return self.inner(attn, *args, **kwargs)


def test_flux_qkv_refuses_unknown_processor(transformer):
    attn = transformer.get_submodule(LAYERS[0])
    attn.set_processor(RecordingProcessor(attn.processor))
    hidden = torch.randn(1, 4, INNER)
    with pytest.raises(SCFGError, match="RecordingProcessor") as error:
        flux_qkv(attn, hidden, hidden)
    for name in ("FluxAttnProcessor", "FluxAttnProcessor2_0"):
        assert name in str(error.value)
    with pytest.raises(SCFGError, match="RecordingProcessor"):
        flux_scale(attn)
    assert "FluxAttnProcessor" in SUPPORTED_PROCESSORS


def test_flux_qkv_refuses_mismatched_inputs(transformer):
    double = transformer.get_submodule(LAYERS[0])
    single = transformer.get_submodule(LAYERS[1])
    hidden = torch.randn(1, 6, INNER)
    text = torch.randn(1, 3, INNER)
    with pytest.raises(SCFGError, match="`encoder_hidden_states` for a double-stream"):
        flux_qkv(double, hidden)
    with pytest.raises(SCFGError, match="no `encoder_hidden_states` for a single-stream"):
        flux_qkv(single, hidden, text)
    with pytest.raises(SCFGError, match=r"projections\['to_q'\]"):  # recorded on another call: wrong length
        flux_qkv(double, hidden, text, projections={"to_q": torch.zeros(1, 5, INNER)})
    with pytest.raises(SCFGError, match="add_q_proj"):  # a single-stream layer has no text projections
        flux_qkv(single, hidden, projections={"add_q_proj": torch.zeros(1, 6, INNER)})
    transformer.fuse_qkv_projections()
    with pytest.raises(SCFGError, match="fused"):  # the fused processor never calls `to_q`
        flux_qkv(double, hidden, text, projections={"to_q": double.to_q(hidden)})


def test_tiny_flux_pipeline_runs_true_cfg(tiny_flux_path):
    """The fixture loads offline through `from_pretrained` and runs true CFG at a non-square size."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(tiny_flux_path))
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red cat",
        negative_prompt="blurry",
        true_cfg_scale=4.0,
        num_inference_steps=2,
        height=32,
        width=48,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (48, 32)  # PIL: (width, height)
