"""Per-step cost of S-CFG against plain CFG on full-size denoisers with random weights (no download).

    python benchmarks/overhead.py --model sd15 --reps 5            # SD 1.5 UNet at 512x512, float32 CPU
    python benchmarks/overhead.py --model sdxl --reps 3            # SDXL UNet at 1024x1024
    python benchmarks/overhead.py --model pixart-sigma --size 512  # PixArt-Sigma, SD3-medium: --model sd3
    python benchmarks/overhead.py --model flux --size 512 --flux-blocks 2  # FLUX.1 true CFG, cut to 2 + 4 blocks
    python benchmarks/overhead.py --model sd15 --device cuda --dtype float16

Methods, interleaved A B C A B C ... after a warm-up, median over `--reps` steps each:
- `cfg`: the denoiser on the CFG batch [uncond, cond] (or, for FLUX's true CFG, a cond pass then an uncond pass)
  plus the CFG line;
- `scfg`: the same with `scfg.enable` (hooks on the used layers only, SDPA kept);
- `scfg-all-layers`: `scfg.SCFGConfig()` as it is, without the family's preset overrides (SDXL: all 60 latent/4
  layers instead of the last of each stack);
- `scfg-reuse`: a step that reuses the previous step's regions (`mask_interval=2`): no attention captured;
- `naive`: prior art: every attention processor replaced by one that materialises softmax(QK^T) per head and
  keeps every map at latent/2 and below; the same S-CFG rule then runs on the stored maps (UNets only: the prior
  ports exist for SD/SDXL).
Peak memory is measured in a fresh subprocess per method (RSS on CPU, max allocated on GPU).
Prints a markdown table with ratios against `cfg` from the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

SD15_UNET = dict(  # runwayml/stable-diffusion-v1-5 unet/config.json
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)
SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
PIXART_SIGMA = dict(  # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS transformer/config.json
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=8,
    num_layers=28,
    cross_attention_dim=1152,
    caption_channels=4096,
    sample_size=128,
    patch_size=2,
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    interpolation_scale=2,
    use_additional_conditions=False,
)
FLUX_DEV = dict(  # black-forest-labs/FLUX.1-dev transformer/config.json, 19 + 38 blocks cut to --flux-blocks
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
SD3_MEDIUM = dict(  # stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
)


@dataclass(frozen=True)
class Model:
    """A full-size denoiser from its real config: how to build it, its CFG-batch inputs, and the attribute names
    under which a pipeline holds it (what `scfg.enable` recognises the family by)."""

    name: str
    size: int  # image side in pixels (the latent is size / 8)
    build: Callable[[], nn.Module]
    inputs: Callable[[int, torch.device, torch.dtype], dict]
    holder: tuple[str, ...]
    naive: bool  # prior art exists (UNets): measure the naive approach too
    passes: str = "batched"  # how its pipeline runs CFG: one [uncond, cond] batch, or "separate" cond/uncond passes


def _unet(config):
    def build():
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel(**config)

    return build


def _transformer(cls_name, config):
    def build():
        import diffusers

        return getattr(diffusers, cls_name)(**config)

    return build


def _sd15_inputs(latent, device, dtype):
    return dict(
        sample=torch.randn(2, 4, latent, latent, device=device, dtype=dtype),
        timestep=torch.tensor(500, device=device),
        encoder_hidden_states=torch.randn(2, 77, 768, device=device, dtype=dtype),
    )


def _sdxl_inputs(latent, device, dtype):
    size = latent * 8
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, device=device, dtype=dtype)
    return dict(
        sample=torch.randn(2, 4, latent, latent, device=device, dtype=dtype),
        timestep=torch.tensor(500, device=device),
        encoder_hidden_states=torch.randn(2, 77, 2048, device=device, dtype=dtype),
        added_cond_kwargs={"text_embeds": torch.randn(2, 1280, device=device, dtype=dtype), "time_ids": time_ids},
    )


def _pixart_inputs(latent, device, dtype):
    return dict(
        hidden_states=torch.randn(2, 4, latent, latent, device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(2, 300, 4096, device=device, dtype=dtype),
        encoder_attention_mask=torch.ones(2, 300, device=device, dtype=dtype),
        timestep=torch.tensor([500, 500], device=device),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


def _sd3_inputs(latent, device, dtype):
    return dict(
        hidden_states=torch.randn(2, 16, latent, latent, device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(2, 333, 4096, device=device, dtype=dtype),  # 77 CLIP + 256 T5
        pooled_projections=torch.randn(2, 2048, device=device, dtype=dtype),
        timestep=torch.tensor([500, 500], device=device),
    )


def _flux(config):
    def build():
        from diffusers import FluxTransformer2DModel

        # The whole 12B model does not fit in 24 GiB in float32: the blocks are cut to --flux-blocks k double- and
        # 2k single-stream ones, every width, head count and the 512-token text kept. S-CFG's extra work is per
        # captured double-stream block (the middle half: 11 of the full 19, all k here) and the step's cost per
        # block (a single-stream block costs about half a double one), so (time ratio - 1) transfers to the full
        # model multiplied by (11 / k) / (38 / 2k) = 0.58 at k = 2.
        blocks = int(_FLUX_BLOCKS[0])
        return FluxTransformer2DModel(**{**config, "num_layers": blocks, "num_single_layers": 2 * blocks})

    return build


_FLUX_BLOCKS = [2]


def _flux_inputs(latent, device, dtype):
    tokens = (latent // 2) ** 2
    rows, cols = torch.meshgrid(torch.arange(latent // 2), torch.arange(latent // 2), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).to(device, dtype)
    return dict(
        hidden_states=torch.randn(1, tokens, 64, device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(1, 512, 4096, device=device, dtype=dtype),
        pooled_projections=torch.randn(1, 768, device=device, dtype=dtype),
        timestep=torch.tensor([0.5], device=device, dtype=dtype),
        guidance=torch.tensor([3.5], device=device, dtype=dtype),
        img_ids=img_ids,
        txt_ids=torch.zeros(512, 3, device=device, dtype=dtype),
    )


MODELS = {
    "sd15": Model("SD 1.5 UNet", 512, _unet(SD15_UNET), _sd15_inputs, ("unet",), True),
    "sdxl": Model("SDXL UNet", 1024, _unet(SDXL_UNET), _sdxl_inputs, ("unet", "text_encoder_2"), True),
    "pixart-sigma": Model(
        "PixArt-Sigma",
        1024,
        _transformer("PixArtTransformer2DModel", PIXART_SIGMA),
        _pixart_inputs,
        ("transformer",),
        False,
    ),
    "flux": Model("FLUX.1-dev (true CFG)", 1024, _flux(FLUX_DEV), _flux_inputs, ("transformer",), False, "separate"),
    "sd3": Model(
        "SD3-medium MMDiT",
        1024,
        _transformer("SD3Transformer2DModel", SD3_MEDIUM),
        _sd3_inputs,
        ("transformer",),
        False,
    ),
}


def build(model: Model, size: int, device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    denoiser = model.build().to(device, dtype).eval()
    return denoiser, model.inputs(size // 8, torch.device(device), dtype)


def fake_pipe(model: Model, denoiser, guidance_scale=7.5, timesteps=(500,)):
    """The attributes `scfg.enable` reads from a pipeline during a denoising step."""
    holder = SimpleNamespace(
        do_classifier_free_guidance=True,
        guidance_scale=guidance_scale,
        guidance_rescale=0.0,
        scheduler=SimpleNamespace(timesteps=torch.tensor(timesteps)),
    )
    setattr(holder, model.holder[0], denoiser)
    for extra in model.holder[1:]:
        setattr(holder, extra, None)
    return holder


class NaiveProcessor:
    """Prior art: materialised softmax per head for every layer, maps kept for latent/2 and below."""

    def __init__(self, name, store, keep_max_queries):
        self.name, self.store, self.keep = name, store, keep_max_queries

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        b, q_len, _ = hidden_states.shape
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        heads = attn.heads
        d = q.shape[-1] // heads
        q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(dim=-1)
        if q_len <= self.keep:
            self.store[self.name] = probs.mean(dim=1)
        out = (probs @ v).transpose(1, 2).reshape(b, q_len, heads * d)
        return attn.to_out[1](attn.to_out[0](out))


@dataclass
class Bench:
    model: Model
    denoiser: nn.Module
    inputs: dict
    device: str
    uncond_text: torch.Tensor | None = None  # the negative prompt's states, for separate-pass models

    def forward(self, **overrides):
        return self.denoiser(**{**self.inputs, **overrides}).sample

    def latent(self) -> torch.Tensor:
        return self.inputs["sample"] if "sample" in self.inputs else self.inputs["hidden_states"]


def cfg_line(pred, g=7.5):
    u, c = pred.chunk(2)
    # learned-sigma channels (PixArt) are not guided
    return u[:, : c.shape[1]] + g * (c - u)


def denoise(bench: Bench, g=7.5, **overrides):
    """One step's denoiser work and CFG line, as the model's pipeline runs it: one [uncond, cond] batch, or a cond
    pass then an uncond pass (FLUX's true CFG)."""
    if bench.model.passes == "separate":
        cond = bench.forward(**overrides)
        uncond = bench.forward(**{"encoder_hidden_states": bench.uncond_text, **overrides})
        return uncond + g * (cond - uncond)
    return cfg_line(bench.forward(**overrides), g)


def enabled(bench: Bench, g=7.5, config=None, timesteps=(500,)):
    """`scfg.enable` on a holder of the denoiser, with the CFG layout its pipeline uses."""
    import scfg
    from scfg.engine import CFGLayout

    layout = CFGLayout("separate", ("cond", "uncond"), "uncond", g) if bench.model.passes == "separate" else None
    return scfg.enable(fake_pipe(bench.model, bench.denoiser, g, timesteps), config, layout=layout)


def cfg_step(bench: Bench, g=7.5):
    return denoise(bench, g)


def scfg_step(bench: Bench, g=7.5):
    with enabled(bench, g):
        return denoise(bench, g)


def scfg_all_layers_step(bench: Bench, g=7.5):
    """S-CFG with an `SCFGConfig` object as it is (no family preset overrides): e.g. all 60 SDXL latent/4 layers."""
    import scfg

    with enabled(bench, g, scfg.SCFGConfig()):
        return denoise(bench, g)


def scfg_reuse_step(bench: Bench, g=7.5):
    """One step that reuses the previous step's regions (`mask_interval=2`); times only that step."""
    import scfg

    t = bench.inputs["timestep"]  # 500, or FLUX's 0.5 (its family reads t * 1000)
    with enabled(bench, g, scfg.SCFGConfig(mask_interval=2), (500, 499)):
        denoise(bench, g)  # step 0 (t = 500) computes the regions
        sync(bench.device)
        t0 = time.perf_counter()
        denoise(bench, g, timestep=(t * 499 / 500).to(t.dtype) if t.is_floating_point() else torch.full_like(t, 499))
        sync(bench.device)
        return time.perf_counter() - t0


def naive_step(bench: Bench, g=7.5):
    """Prior art's capture (every processor replaced, every map kept), then the same engine as `scfg.enable`."""
    from scfg.capture import grid_for, level_grid
    from scfg.engine import CFGLayout, MapAccumulator, guided_prediction, step_regions
    from scfg.families import family_for

    unet, x = bench.denoiser, bench.latent()
    family = family_for(fake_pipe(bench.model, unet))
    store: dict = {}
    keep = (x.shape[-2] // 2) * (x.shape[-1] // 2)
    originals = dict(unet.attn_processors)
    unet.set_attn_processor({n: NaiveProcessor(n[: -len(".processor")], store, keep) for n in originals})
    try:
        pred = bench.forward()
        grid = tuple(x.shape[-2:])
        accumulator = MapAccumulator(level_grid(grid, min(family.default_levels)))
        for pair in family.layer_pairs(unet):
            if pair.level in family.default_levels:
                cross = store[pair.cross]
                accumulator.add(cross, store.get(pair.self_attn), grid_for(cross.shape[1], grid))
        layout = CFGLayout("batched", ("uncond", "cond"), "uncond", g)
        regions = step_regions(accumulator.result().split(layout))
        u, c = pred.chunk(2)
        return guided_prediction(u, c, regions, layout).guided
    finally:
        unet.set_attn_processor(dict(originals))


STEPS = {
    "cfg": cfg_step,
    "scfg": scfg_step,
    "scfg-all-layers": scfg_all_layers_step,
    "scfg-reuse": scfg_reuse_step,
    "naive": naive_step,
}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_one(method: str, bench: Bench) -> float:
    sync(bench.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        own = STEPS[method](bench)
    sync(bench.device)
    return own if isinstance(own, float) else time.perf_counter() - t0


def breakdown(bench: Bench):
    """Seconds spent in capture, segmentation and the rate rule during one S-CFG step, from the engine's own
    `torch.profiler.record_function` labels (`scfg.capture`, `scfg.segmentation`, `scfg.rate`); the profiler's
    own cost inflates the step a little, so the shares are of the profiled step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        total = time_one("scfg", bench)
    spent = {"capture": 0.0, "segmentation": 0.0, "rate": 0.0}
    for event in prof.key_averages():
        part = event.key.removeprefix("scfg.")
        if event.key.startswith("scfg.") and part in spent:
            device_time = getattr(event, "device_time_total", 0.0) if bench.device.startswith("cuda") else 0.0
            spent[part] += max(event.cpu_time_total, device_time) / 1e6
    return spent, total


def peak_memory(args, method):
    """Peak memory of one step of `method`, in a fresh process."""
    command = [sys.executable, __file__, "--model", args.model, "--size", str(args.size), "--device", args.device]
    command += ["--dtype", args.dtype, "--threads", str(args.threads), "--flux-blocks", str(args.flux_blocks)]
    command += ["--_memory", method]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:  # e.g. SIGKILL from the kernel's out-of-memory killer
        reason = "killed: out of memory?" if out.returncode in (-9, 137) else f"exit code {out.returncode}"
        print(f"peak memory of {method}: the process failed ({reason})", file=sys.stderr)
        return {"failed": reason}
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_child(args):
    """Peak memory during one step: max allocated on GPU; on CPU, RSS sampled every 2 ms by a thread (the
    process-wide `ru_maxrss` would report the model's construction instead)."""
    import threading

    import psutil

    bench = make_bench(args)
    if args.device.startswith("cuda"):
        time_one(args._memory, bench)  # warm-up: allocator pools, kernels
        torch.cuda.reset_peak_memory_stats()
        time_one(args._memory, bench)
        peak = torch.cuda.max_memory_allocated()
    else:
        process, samples, done = psutil.Process(), [], threading.Event()

        def sample():
            while not done.is_set():
                samples.append(process.memory_info().rss)
                time.sleep(0.002)

        thread = threading.Thread(target=sample)
        thread.start()
        time_one(args._memory, bench)
        done.set()
        thread.join()
        peak = max(samples)
    print(json.dumps({"peak": peak}))


def make_bench(args) -> Bench:
    model = MODELS[args.model]
    _FLUX_BLOCKS[0] = args.flux_blocks
    denoiser, inputs = build(model, args.size, args.device, getattr(torch, args.dtype))
    uncond = torch.randn_like(inputs["encoder_hidden_states"]) if model.passes == "separate" else None
    return Bench(model, denoiser, inputs, args.device, uncond)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="sd15")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's own)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per method before timing")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--flux-blocks", type=int, default=2, help="FLUX: k double- and 2k single-stream blocks")
    parser.add_argument("--methods", nargs="+", default=None, help="default: cfg scfg scfg-reuse (+ naive for UNets)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-methods", nargs="+", default=None, help="methods whose peak memory is measured")
    parser.add_argument("--_memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    model = MODELS[args.model]
    args.size = args.size or model.size
    if args.methods is None:
        args.methods = ["cfg", "scfg", "scfg-reuse"] + (["naive"] if model.naive else [])
    if "naive" in args.methods and not model.naive:
        parser.error(f"--model {args.model}: the naive approach is only implemented for UNets (sd15, sdxl)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._memory:
        memory_child(args)
        return
    bench = make_bench(args)
    for _ in range(args.warmup):
        for method in args.methods:
            time_one(method, bench)
    times = {m: [] for m in args.methods}
    for rep in range(args.reps):
        for method in args.methods:
            times[method].append(time_one(method, bench))
            print(f"rep {rep}: {method} {times[method][-1]:.3f} s", file=sys.stderr, flush=True)
    spent, total = breakdown(bench)
    median = {m: statistics.median(v) for m, v in times.items()}
    params = sum(p.numel() for p in bench.denoiser.parameters()) / 1e6
    print(f"timings: {json.dumps(times)}; breakdown {json.dumps(spent)} of {total:.3f} s", flush=True)
    del bench  # the memory children each build their own model: do not hold a second copy meanwhile
    gc.collect()
    measured = [m for m in args.methods if args.memory_methods is None or m in args.memory_methods]
    memory = {} if args.no_memory else {m: peak_memory(args, m) for m in measured}
    print(
        f"{model.name} ({params:.0f}M parameters, random weights) at {args.size}x{args.size}, "
        f"{'cond + uncond passes' if model.passes == 'separate' else 'batch 2 (uncond+cond)'}, {args.device} {args.dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{platform.processor() or platform.machine()}; medians of {args.reps} interleaved steps after "
        f"{args.warmup} warm-up"
    )
    print()
    print("| method | step time (s) | time / CFG | peak memory (GiB) | memory / CFG |")
    print("|---|---|---|---|---|")
    for m in args.methods:
        mem = memory.get(m, {}).get("peak")
        base = memory.get("cfg", {}).get("peak")
        mem_s = f"{mem / 2**30:.2f}" if mem else memory.get(m, {}).get("failed", "-")
        ratio_s = f"{mem / base:.3f}" if mem and base else "-"
        print(f"| {m} | {median[m]:.3f} | {median[m] / median['cfg']:.3f} | {mem_s} | {ratio_s} |")
    if "scfg" in median and "naive" in median:
        ours, theirs = median["scfg"] - median["cfg"], median["naive"] - median["cfg"]
        print(
            f"\noverhead: ours {ours:+.3f} s, naive {theirs:+.3f} s, ours / naive = "
            f"{ours / theirs if theirs > 0 else float('nan'):.3f}"
        )
    share = ", ".join(f"{k} {v:.4f} s ({v / total:.1%})" for k, v in spent.items())
    print(f"S-CFG step breakdown (one instrumented step of {total:.3f} s): {share}; all steps: {json.dumps(times)}")


if __name__ == "__main__":
    main()
