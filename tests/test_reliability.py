"""Bad and unusual input: each case gives a clear error, or an image that matches the float64 reference.

Whatever happens, the pipeline is left exactly as it was (processors, hooks, methods).
"""

from __future__ import annotations

import gc
import logging
import threading

import psutil
import pytest
import torch
from conftest import load_pipe
from diffusers import StableDiffusionPipeline
from test_reference import reference_sample, relative_close, scfg_sample

import scfg
from scfg import SCFGConfig, SCFGError

LONG_PROMPT = " ".join(["a red cat on the sofa left of the blue dog"] * 12)  # > 77 tokens


def latents(n, h=32, w=48, seed=0):
    return torch.randn(n, 4, h, w, generator=torch.Generator().manual_seed(seed))


def is_restored(pipe, processors):
    unet = pipe.unet
    return (
        all(unet.attn_processors[k] is v for k, v in processors.items())
        and not any(m._forward_pre_hooks or m._forward_hooks for m in unet.modules())
        and type(pipe).__call__ is StableDiffusionPipeline.__call__
    )


# -- cases that must match the float64 reference ---------------------------------------------------------------

REFERENCE_CASES = {
    "empty-prompt": dict(prompts=[""], negative=[""]),
    "long-prompt": dict(prompts=[LONG_PROMPT], negative=["green"]),
    "different-lengths": dict(prompts=["a cat", LONG_PROMPT[:120]], negative=["", "the red sofa of the dog"]),
    "one-step": dict(steps=1),
    "two-steps": dict(steps=2),
    "scale-1.0001": dict(guidance_scale=1.0001),
    "scale-50": dict(guidance_scale=50.0),
    "tiny-64x64": dict(h=32, w=32),
    "non-square-1x4": dict(h=16, w=64),
    "non-square-4x1": dict(h=64, w=16),
    "odd-grid": dict(h=36, w=52),
    "paper-preset": dict(preset="paper"),
    "dpm++": dict(scheduler="dpm++"),
}


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_unusual_input_matches_reference(tiny_sd_path, case):
    spec = {
        "prompts": ["a red cat"],
        "negative": ["blue"],
        "steps": 3,
        "guidance_scale": 7.5,
        "h": 32,
        "w": 48,
        "preset": "official",
        "scheduler": "ddim",
        **REFERENCE_CASES[case],
    }
    x = latents(len(spec["prompts"]), spec["h"], spec["w"])
    args = (tiny_sd_path, spec["scheduler"], spec["guidance_scale"], spec["steps"], x, spec["preset"], 1)
    ours, reports = scfg_sample(*args, prompts=spec["prompts"], negative=spec["negative"])
    ref, _ = reference_sample(*args, prompts=spec["prompts"], negative=spec["negative"])
    assert torch.isfinite(ours).all()
    assert len(reports) == spec["steps"]
    relative_close(ours, ref)


# -- cases that must give a clear error --------------------------------------------------------------------------

ERROR_CASES = {
    "height-not-multiple-of-8": (dict(height=60, width=64), ValueError, "divisible by 8"),
    "mismatched-negative-batch": (
        dict(prompt=["a cat", "a dog"], negative_prompt=["x", "y", "z"]),
        ValueError,
        "batch size",
    ),
    "negative-prompt-type": (dict(prompt=["a cat"], negative_prompt="x"), TypeError, "same type"),
    "steps-zero": (dict(num_inference_steps=0), Exception, ""),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_pipeline_input_raises_and_restores(tiny_sd, case):
    kwargs, error, message = ERROR_CASES[case]
    kwargs = {
        "prompt": "a cat",
        "height": 64,
        "width": 64,
        "num_inference_steps": 2,
        "output_type": "latent",
        **kwargs,
    }
    processors = dict(tiny_sd.unet.attn_processors)
    with pytest.raises(error, match=message), scfg.enable(tiny_sd):
        tiny_sd(**kwargs)
    assert is_restored(tiny_sd, processors)


CONFIG_CASES = {
    "clamp-min-above-max": ({"rate_clamp": (2.0, 1.0)}, "rate_clamp"),
    "negative-clamp": ({"rate_clamp": (-1.0, 1.0)}, "rate_clamp"),
    "negative-power": ({"completion_order": -2}, "completion_order"),
    "zero-power": ({"completion_order": 0}, "completion_order"),
    "levels-not-power-of-two": ({"levels": (3,)}, "levels"),
    "levels-empty": ({"levels": ()}, "levels"),
    "unknown-completion": ({"completion": "cubic"}, "completion"),
    "unknown-tie-break": ({"tie_break": "random"}, "tie_break"),
    "unknown-benchmark": ({"benchmark": "median"}, "benchmark"),
    "nan-cap": ({"max_effective_scale": float("nan")}, "max_effective_scale"),
    "fractions-reversed": ({"start_fraction": 0.8, "stop_fraction": 0.2}, "start_fraction"),
    "negative-smoothing": ({"rate_map_smoothing": -1.0}, "rate_map_smoothing"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_invalid_config_is_rejected_at_construction(case):
    overrides, field = CONFIG_CASES[case]
    with pytest.raises(SCFGError, match=f"`{field}`"):
        SCFGConfig(**overrides)


def test_unknown_preset_is_rejected(tiny_sd):
    with pytest.raises(SCFGError, match="preset"):
        scfg.enable(tiny_sd, "fastest")


def test_unsupported_denoiser_is_rejected():
    class Pipe:
        transformer = torch.nn.Linear(1, 1)

    with pytest.raises(SCFGError, match="supported model family"):
        scfg.enable(Pipe())


# -- guidance scales without CFG ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.0, 1.0, -3.0, float("nan")])
def test_scales_without_cfg_are_plain_sampling(tiny_sd, scale):
    recorder = scfg.Recorder()
    x = latents(1)
    kwargs = dict(height=64, width=96, num_inference_steps=2, guidance_scale=scale, output_type="latent")
    plain = tiny_sd("a cat", latents=x.clone(), **kwargs).images
    with scfg.enable(tiny_sd, on_step=recorder):
        ours = tiny_sd("a cat", latents=x.clone(), **kwargs).images
    assert recorder.steps == []
    assert torch.equal(ours, plain)


# -- precision ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gives_finite_images(tiny_sd_path, dtype):
    pipe = load_pipe(tiny_sd_path).to(dtype)
    recorder = scfg.Recorder()
    with scfg.enable(pipe, on_step=recorder):
        out = pipe(
            "a red cat", height=64, width=96, num_inference_steps=2, latents=latents(1).to(dtype), output_type="latent"
        ).images
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert all(torch.isfinite(r.rate_map).all() for r in recorder.steps)


def test_non_finite_maps_fall_back_to_cfg_with_warning(tiny_sd, monkeypatch, caplog):
    import scfg.capture

    original = scfg.capture.rows_from_projections

    def overflowing(attn, query, key, *args, **kwargs):
        return original(attn, query * float("inf"), key, *args, **kwargs)  # what an fp16 logit overflow would leave

    monkeypatch.setattr(scfg.capture, "rows_from_projections", overflowing)
    x = latents(1)
    kwargs = dict(height=64, width=96, num_inference_steps=2, output_type="latent")
    plain = tiny_sd("a cat", latents=x.clone(), **kwargs).images
    with caplog.at_level(logging.WARNING, logger="scfg"), scfg.enable(tiny_sd):
        ours = tiny_sd("a cat", latents=x.clone(), **kwargs).images
    assert torch.equal(ours, plain)
    assert sum("plain CFG" in r.message for r in caplog.records) == 1


# -- always restored --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exception", [RuntimeError, KeyboardInterrupt])
def test_restored_after_exception_mid_loop(tiny_sd, exception):
    processors = dict(tiny_sd.unet.attn_processors)

    def interrupt(pipe, step, timestep, kwargs):
        if step == 1:
            raise exception("stop")
        return kwargs

    with pytest.raises(exception), scfg.enable(tiny_sd):
        tiny_sd(
            "a cat", height=64, width=64, num_inference_steps=3, callback_on_step_end=interrupt, output_type="latent"
        )
    assert is_restored(tiny_sd, processors)


def test_two_pipelines_sharing_one_unet(tiny_sd):
    from diffusers import StableDiffusionPipeline

    other = StableDiffusionPipeline(**tiny_sd.components)
    processors = dict(tiny_sd.unet.attn_processors)
    with scfg.enable(tiny_sd), pytest.raises(SCFGError, match="sharing"), scfg.enable(other):
        pass
    assert is_restored(tiny_sd, processors) and is_restored(other, processors)
    with scfg.enable(other):  # usable once the first context has ended
        other("a cat", height=64, width=64, num_inference_steps=1, output_type="latent")
    assert is_restored(other, processors)


def test_same_context_cannot_be_entered_twice(tiny_sd):
    guard = scfg.enable(tiny_sd)
    with guard, pytest.raises(SCFGError, match="already entered"), guard:
        pass


def test_context_is_reusable_after_exit(tiny_sd):
    guard = scfg.enable(tiny_sd)
    recorder_runs = []
    for _ in range(2):
        with guard:
            recorder_runs.append(
                tiny_sd(
                    "a cat",
                    height=64,
                    width=64,
                    num_inference_steps=1,
                    latents=latents(1, 32, 32),
                    output_type="latent",
                ).images
            )
    assert torch.equal(recorder_runs[0], recorder_runs[1])  # the same computation twice, in the same thread


# -- concurrency and leaks -----------------------------------------------------------------------------------------


def test_two_threads_two_pipelines_get_their_own_masks(tiny_sd_path):
    # float64: a run in a thread is not guaranteed to be bit-identical to the same run in the main thread (a
    # reduction's intra-op split may differ), so the two may differ by rounding, which float64 keeps far from
    # flipping a mask's near-tie
    pipes = [load_pipe(tiny_sd_path).to(torch.float64), load_pipe(tiny_sd_path).to(torch.float64)]
    prompts = ["a red cat on the sofa", "a blue dog left of the green square"]
    x = [latents(1, seed=i).double() for i in range(2)]

    def generate(i, results):
        recorder = scfg.Recorder()
        with scfg.enable(pipes[i], on_step=recorder):
            out = pipes[i](
                prompts[i], height=64, width=96, num_inference_steps=4, latents=x[i].clone(), output_type="latent"
            ).images
        results[i] = (out, recorder.steps)

    sequential: dict = {}
    for i in range(2):
        generate(i, sequential)
    concurrent: dict = {}
    threads = [threading.Thread(target=generate, args=(i, concurrent)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        # ~1e-16 relative per operation, through 4 steps of a tiny UNet: far below 1e-9, while masks or rates taken
        # from the other thread's prompt move the latents by far more than 1e-3
        torch.testing.assert_close(concurrent[i][0], sequential[i][0], rtol=1e-9, atol=1e-9)
        for a, b in zip(concurrent[i][1], sequential[i][1], strict=True):
            assert torch.equal(a.token_masks, b.token_masks)


def test_memory_stays_flat_over_many_generations(tiny_sd):
    process = psutil.Process()
    kwargs = dict(height=64, width=64, num_inference_steps=1, output_type="latent")

    def generate(n):
        for _ in range(n):
            with scfg.enable(tiny_sd):
                tiny_sd("a red cat", **kwargs)
        gc.collect()

    generate(20)  # warm-up: allocator pools, lazy imports
    before = process.memory_info().rss
    generate(200)
    grown = process.memory_info().rss - before
    assert grown < 30 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 200 generations"


def test_recorder_memory_is_bounded(tiny_sd):
    recorder = scfg.Recorder(max_steps=5)
    with scfg.enable(tiny_sd, on_step=recorder):
        for _ in range(4):
            tiny_sd("a cat", height=64, width=64, num_inference_steps=3, output_type="latent")
    assert len(recorder.steps) == 5
