"""What one captured transformer layer costs S-CFG, against what the layer itself costs and against the floor.

For the attention geometry of a real model at its native size (batch 2: uncond + cond; random q/k laid out as a
processor makes them, `[B, L, H d]` viewed per head), times in the same run:

- `layer attention`: the layer's own `scaled_dot_product_attention` over all its tokens (what a CFG step pays);
- `floor`: the same fused attention for the pooled queries only (`mask_pool=2`: a quarter of the rows). S-CFG
  needs at least these scores and their softmax for its rows, so no implementation of this recipe can cost less
  than this per layer (the completion's products and the maps are small beside it);
- `S-CFG rows + completion`: what the engine does for the layer: the pooled `AttentionRows` (the self block for
  joint attention, renormalised), the completion `(S + 3 S²) C / 4` and the cross block, at the default chunk;
- the same with the scores formed in head chunks up to the 256 MiB budget (the previous code's blocks).

    python benchmarks/layer_cost.py --threads 2

Each time is the median of `--reps` calls after one warm-up call. The share of a CFG step follows from the
step times measured by `benchmarks/overhead.py` (RESULTS.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from scfg.attention import DEFAULT_BUDGET, DEFAULT_CHUNK, AttentionRows
from scfg.segment import complete_cross_attention

# name: (heads, head dim, image tokens as a (h, w) grid, text tokens in the softmax, text tokens kept, joint)
LAYERS = {
    # PixArt-Sigma 1024 px: 16 x 72, a 64x64 token grid; self- and cross-attention are separate layers
    "pixart-sigma": (16, 72, (64, 64), 300, 12, False),
    # SD3-medium 1024 px: 24 x 64, a 64x64 grid and 333 text tokens (77 CLIP + 256 T5) in one joint softmax
    "sd3": (24, 64, (64, 64), 333, 333, True),
}


def timed(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def processor_layout(batch: int, tokens: int, heads: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(batch, tokens, heads * dim, generator=generator).view(batch, tokens, heads, dim).transpose(1, 2)


def measure(name: str, reps: int) -> dict[str, float]:
    heads, dim, grid, text, kept, joint = LAYERS[name]
    g = torch.Generator().manual_seed(0)
    images = grid[0] * grid[1]
    keys = images + text if joint else images
    query = processor_layout(2, images, heads, dim, g)
    key = processor_layout(2, keys, heads, dim, g)
    value = processor_layout(2, keys, heads, dim, g)
    text_key = processor_layout(2, text, heads, dim, g)  # the cross-attention layer's keys (PixArt)
    scale = dim**-0.5
    pooled = AttentionRows(query, key, scale).pool_queries(grid, 2)

    def ours(chunk: int) -> torch.Tensor:
        rows = AttentionRows(query, key, scale, chunk=chunk).pool_queries(grid, 2)
        if joint:
            cross = rows.select(slice(images, images + kept)).dense()
            self_rows = rows.select(slice(0, images))
        else:
            cross_rows = AttentionRows(query, text_key, scale, columns=slice(0, kept), renormalise=True)
            cross = cross_rows.pool_queries(grid, 2).dense()
            self_rows = rows
        return complete_cross_attention(cross, self_rows.pool_columns(grid, 2))

    return {
        "layer attention": timed(lambda: F.scaled_dot_product_attention(query, key, value), reps),
        "floor": timed(lambda: F.scaled_dot_product_attention(pooled.query, key, value), reps),
        "S-CFG rows + completion": timed(lambda: ours(DEFAULT_CHUNK), reps),
        "same, 256 MiB score blocks": timed(lambda: ours(DEFAULT_BUDGET), reps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=sorted(LAYERS), choices=sorted(LAYERS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, float32, batch 2, medians of {args.reps}")
    print()
    print("| layer (1024 px) | part | seconds | / layer attention | / floor |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for name in args.models:
            times = measure(name, args.reps)
            base, floor = times["layer attention"], times["floor"]
            for part, seconds in times.items():
                print(f"| {name} | {part} | {seconds:.3f} | {seconds / base:.3f} | {seconds / floor:.2f} |")


if __name__ == "__main__":
    main()
