"""What `mask_interval=k` (regions recomputed every k steps) costs in fidelity and saves in time, on a trained model.

    python benchmarks/mask_reuse.py                      # the shipped demo model, 32 held-out prompts
    python benchmarks/mask_reuse.py --model PATH --intervals 1 2 4 8

For each k: S-CFG (`official`) images from the same noise as k=1; the mean absolute pixel difference to k=1 and
its PSNR, the demo scorer's accuracies (when the model is the demo domain), and the sampling time per image
against plain CFG, all from this run. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def generate(pipe, prompts, args, config=None):
    import scfg

    kwargs = dict(
        guidance_scale=args.scale,
        num_inference_steps=args.steps,
        output_type="np",
        generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))],
    )
    t0 = time.perf_counter()
    if config is None:
        images = pipe(prompts, **kwargs).images
    else:
        with scfg.enable(pipe, config):
            images = pipe(prompts, **kwargs).images
    return (images * 255).round().astype(np.uint8), time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default=None, help="pipeline folder or demo:scenes (default: the shipped demo model)"
    )
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--intervals", type=int, nargs="+", default=[1, 2, 3, 5, 10])
    parser.add_argument("--scale", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import StableDiffusionPipeline

    from scfg import SCFGConfig
    from scfg.demo import demo_domain, resolve_model
    from scfg.demo.bench import held_out_prompts
    from scfg.demo.score import score_image

    folder = resolve_model(args.model)
    domain = demo_domain(folder)  # a demo model's captions and S-CFG levels (None: any other model)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    prompts = held_out_prompts(args.prompts, backgrounds=None if domain is None else domain.backgrounds)
    levels = {} if domain is None else {"levels": domain.levels}
    generate(pipe, prompts[:2], args)  # warm-up
    _, cfg_seconds = generate(pipe, prompts, args)
    rows, reference = [], None
    for k in args.intervals:
        images, seconds = generate(pipe, prompts, args, SCFGConfig(mask_interval=k, **levels))
        if reference is None:
            reference = images
        diff = np.abs(images.astype(np.float64) - reference.astype(np.float64))
        mse = float((diff**2).mean())
        psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
        scores = [score_image(im, p)[0] for im, p in zip(images, prompts, strict=True)]
        rows.append(
            (
                k,
                seconds,
                float(diff.mean()),
                psnr,
                np.mean([s.shape == 1.0 for s in scores]),
                np.mean([s.full for s in scores]),
            )
        )
    print(
        f"{len(prompts)} prompts, guidance {args.scale}, {args.steps} DDIM steps, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}; plain CFG {cfg_seconds / len(prompts):.3f} s per image"
    )
    print()
    print(
        "| mask_interval | s / image | time / CFG | mean abs diff to k=1 (0-255) | PSNR to k=1 (dB) | objects right | full prompt |"
    )
    print("|---|---|---|---|---|---|---|")
    for k, seconds, mad, psnr, present, full in rows:
        print(
            f"| {k} | {seconds / len(prompts):.3f} | {seconds / cfg_seconds:.3f} | {mad:.2f} | {psnr:.1f} | "
            f"{present:.3f} | {full:.3f} |"
        )


if __name__ == "__main__":
    main()
