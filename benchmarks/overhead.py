"""Per-step cost of S-CFG against plain CFG on full-size denoisers with random weights (no download).

    python benchmarks/overhead.py --model sd15 --reps 5            # SD 1.5 UNet at 512x512, float32 CPU
    python benchmarks/overhead.py --model sd15 --device cuda --dtype float16

Methods, interleaved A B C A B C ... after a warm-up, median over `--reps` steps each:
- `cfg`: the UNet on the CFG batch [uncond, cond] plus the CFG line;
- `scfg`: the same with `scfg.enable` (hooks on the used layers only, SDPA kept);
- `naive`: prior art: every attention processor replaced by one that materialises softmax(QK^T) per head and
  keeps every map at latent/2 and below; the same S-CFG rule then runs on the stored maps.
Peak memory is measured in a fresh subprocess per method (RSS on CPU, max allocated on GPU).
Prints a markdown table with ratios against `cfg` from the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

SD15_UNET = dict(
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
MODELS = {"sd15": (SD15_UNET, 512, 77, 768)}


def build(model: str, device: str, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    config, size, tokens, dim = MODELS[model]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).to(device, dtype).eval()
    latent = size // 8
    x = torch.randn(2, 4, latent, latent, device=device, dtype=dtype)
    emb = torch.randn(2, tokens, dim, device=device, dtype=dtype)
    return unet, x, emb


def fake_pipe(unet, guidance_scale=7.5):
    """The attributes `scfg.enable` reads from a pipeline during a denoising step."""
    return SimpleNamespace(
        unet=unet,
        do_classifier_free_guidance=True,
        guidance_scale=guidance_scale,
        guidance_rescale=0.0,
        scheduler=SimpleNamespace(timesteps=torch.tensor([500])),
    )


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


def naive_step(unet, x, emb, g=7.5):
    from scfg.capture import grid_for, level_grid
    from scfg.families.sd_unet import FAMILY
    from scfg.rule import semantic_guidance
    from scfg.segment import assign_regions, average_layer_maps, foreground_mask

    store: dict = {}
    keep = (x.shape[-2] // 2) * (x.shape[-1] // 2)
    originals = dict(unet.attn_processors)
    unet.set_attn_processor({n: NaiveProcessor(n[: -len(".processor")], store, keep) for n in originals})
    try:
        pred = unet(x, 500, encoder_hidden_states=emb).sample
        hw = tuple(x.shape[-2:])
        layers = []
        for pair in FAMILY.layer_pairs(unet):
            if pair.level in (4, 8):
                cross = store[pair.cross]
                layers.append((cross, store[pair.self_attn], grid_for(cross.shape[1], hw)))
        token, fg = average_layer_maps(layers, level_grid(hw, 4))
        u, c = pred.chunk(2)
        masks = assign_regions(token.chunk(2)[1])
        return semantic_guidance(u, c, masks, foreground_mask(fg.chunk(2)[0]), g).guided
    finally:
        unet.set_attn_processor(dict(originals))


def cfg_step(unet, x, emb, g=7.5):
    u, c = unet(x, 500, encoder_hidden_states=emb).sample.chunk(2)
    return u + g * (c - u)


def scfg_step(unet, x, emb, g=7.5, timings=None):
    import scfg

    with scfg.enable(fake_pipe(unet, g)):
        u, c = unet(x, 500, encoder_hidden_states=emb).sample.chunk(2)
    return u + g * (c - u)


STEPS = {"cfg": cfg_step, "scfg": scfg_step, "naive": naive_step}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_one(fn, unet, x, emb, device):
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        fn(unet, x, emb)
    sync(device)
    return time.perf_counter() - t0


def breakdown(unet, x, emb, device):
    """Seconds spent in capture, segmentation and the rate rule during one S-CFG step."""
    import scfg.capture
    import scfg.integration.pipeline as integ

    spent = {"capture": 0.0, "segmentation": 0.0, "rate": 0.0}

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            sync(device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(device)
            spent[key] += time.perf_counter() - t0
            return out

        return wrapper

    saved = (
        scfg.capture.head_averaged_probs,
        integ.average_layer_maps,
        integ.assign_regions,
        integ.foreground_mask,
        integ.semantic_guidance,
    )
    scfg.capture.head_averaged_probs = timed(saved[0], "capture")
    integ.average_layer_maps = timed(saved[1], "segmentation")
    integ.assign_regions = timed(saved[2], "segmentation")
    integ.foreground_mask = timed(saved[3], "segmentation")
    integ.semantic_guidance = timed(saved[4], "rate")
    try:
        total = time_one(scfg_step, unet, x, emb, device)
    finally:
        (
            scfg.capture.head_averaged_probs,
            integ.average_layer_maps,
            integ.assign_regions,
            integ.foreground_mask,
            integ.semantic_guidance,
        ) = saved
    return spent, total


def peak_memory(args, method):
    """Peak memory of one step of `method`, in a fresh process."""
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--model",
            args.model,
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            "--threads",
            str(args.threads),
            "--_memory",
            method,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_child(args):
    """Peak memory during one step: max allocated on GPU; on CPU, RSS sampled every 2 ms by a thread (the
    process-wide `ru_maxrss` would report the model's construction instead)."""
    import threading

    import psutil

    dtype = getattr(torch, args.dtype)
    unet, x, emb = build(args.model, args.device, dtype)
    time_one(STEPS[args._memory], unet, x, emb, args.device)  # warm-up: allocator pools
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        time_one(STEPS[args._memory], unet, x, emb, args.device)
        peak = torch.cuda.max_memory_allocated()
    else:
        process, samples, done = psutil.Process(), [], threading.Event()

        def sample():
            while not done.is_set():
                samples.append(process.memory_info().rss)
                time.sleep(0.002)

        thread = threading.Thread(target=sample)
        thread.start()
        time_one(STEPS[args._memory], unet, x, emb, args.device)
        done.set()
        thread.join()
        peak = max(samples)
    print(json.dumps({"peak": peak}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="sd15")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=["cfg", "scfg", "naive"])
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--_memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._memory:
        memory_child(args)
        return
    unet, x, emb = build(args.model, args.device, getattr(torch, args.dtype))
    for method in args.methods:  # warm-up
        time_one(STEPS[method], unet, x, emb, args.device)
    times = {m: [] for m in args.methods}
    for _ in range(args.reps):
        for method in args.methods:
            times[method].append(time_one(STEPS[method], unet, x, emb, args.device))
    spent, total = breakdown(unet, x, emb, args.device)
    median = {m: statistics.median(v) for m, v in times.items()}
    memory = {} if args.no_memory else {m: peak_memory(args, m) for m in args.methods}
    size = MODELS[args.model][1]
    print(
        f"model {args.model} {size}x{size}, batch 2 (uncond+cond), {args.device} {args.dtype}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}"
    )
    print()
    print("| method | step time (s) | time / CFG | peak memory (GiB) | memory / CFG |")
    print("|---|---|---|---|---|")
    for m in args.methods:
        mem = memory.get(m, {}).get("peak")
        base = memory.get("cfg", {}).get("peak")
        mem_s = f"{mem / 2**30:.2f}" if mem else "-"
        ratio_s = f"{mem / base:.3f}" if mem and base else "-"
        print(f"| {m} | {median[m]:.3f} | {median[m] / median['cfg']:.3f} | {mem_s} | {ratio_s} |")
    if "scfg" in median and "naive" in median:
        ours, theirs = median["scfg"] - median["cfg"], median["naive"] - median["cfg"]
        print(
            f"\noverhead: ours {ours:+.3f} s, naive {theirs:+.3f} s, ours / naive = "
            f"{ours / theirs if theirs > 0 else float('nan'):.3f}"
        )
    share = ", ".join(f"{k} {v:.4f} s ({v / total:.1%})" for k, v in spent.items())
    print(f"S-CFG step breakdown (one instrumented step of {total:.3f} s): {share}")


if __name__ == "__main__":
    main()
