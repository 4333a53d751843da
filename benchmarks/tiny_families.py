"""Per-step time of S-CFG vs CFG for every supported family, on the tiny test models (CPU).

    python benchmarks/tiny_families.py [--steps 10] [--reps 5]

Builds each family's tiny pipeline with the test-suite builders (tests/conftest.py), then times whole pipeline
calls, CFG and S-CFG interleaved, and prints the median per-step time and the ratio. Tiny denoisers make the
fixed cost of S-CFG (hooks, segmentation, rule) look large; see overhead.py for full-size denoisers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import conftest

import scfg

FAMILIES = {
    "sd_unet": (conftest.build_tiny_sd, "StableDiffusionPipeline", {}),
    "sdxl_unet": (conftest.build_tiny_sdxl, "StableDiffusionXLPipeline", {}),
    "deepfloyd_if": (conftest.build_tiny_if, "IFPipeline", {"clean_caption": False}),
    "pixart": (
        conftest.build_tiny_pixart,
        "PixArtSigmaPipeline",
        {"use_resolution_binning": False, "max_sequence_length": 24},
    ),
    "sd3_mmdit": (conftest.build_tiny_sd3, "StableDiffusion3Pipeline", {"max_sequence_length": 16}),
}


def time_family(pipe, kwargs: dict, steps: int, reps: int) -> dict[str, list[float]]:
    """Seconds per step of CFG and S-CFG, interleaved, after one warm-up call of each."""

    def cfg() -> None:
        pipe("a red cat on the sofa", generator=torch.Generator().manual_seed(0), **kwargs)

    def guided() -> None:
        with scfg.enable(pipe):
            pipe("a red cat on the sofa", generator=torch.Generator().manual_seed(0), **kwargs)

    cfg(), guided()
    times: dict[str, list[float]] = {"cfg": [], "scfg": []}
    for _ in range(reps):
        for key, fn in (("cfg", cfg), ("scfg", guided)):
            t0 = time.perf_counter()
            fn()
            times[key].append((time.perf_counter() - t0) / steps)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    import diffusers

    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, threads {torch.get_num_threads()}")
    print("| family | image | CFG s/step | S-CFG s/step | S-CFG / CFG |")
    print("|---|---|---|---|---|")
    for name, (build, cls_name, extra) in FAMILIES.items():
        with tempfile.TemporaryDirectory() as folder:
            build(folder)
            pipe = getattr(diffusers, cls_name).from_pretrained(folder)
            pipe.set_progress_bar_config(disable=True)
            size = 32 if name == "deepfloyd_if" else 64
            output = "pt" if name == "deepfloyd_if" else "latent"  # the time of the denoising loop only
            kwargs = dict(height=size, width=size, num_inference_steps=args.steps, output_type=output, **extra)

            times = time_family(pipe, kwargs, args.steps, args.reps)
            a, b = statistics.median(times["cfg"]), statistics.median(times["scfg"])
            print(f"| {name} | {size}x{size} | {a * 1000:.1f} ms | {b * 1000:.1f} ms | {b / a:.2f} |")


if __name__ == "__main__":
    main()
