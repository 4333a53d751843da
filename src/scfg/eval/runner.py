"""Generate every (prompt, image index, method, scale) once, resumably, split across accelerate processes.

Layout of a run folder:

    RUN/images/<method>/g<scale>/<prompt_index:05d>_<image_index>.png
    RUN/manifest-<rank>.jsonl      one row per image written by that process (prompt, seed, method, scale, path,
                                   seconds, effective scale, score-norm spread before/after)
    RUN/manifest.jsonl             merged by rank 0 at the end, sorted by (method, scale, prompt, image)

The seed of an image depends only on (prompt index, image index), so every method and scale sees the same noise.
Rerunning skips images already in a manifest whose file exists.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import SCFGConfig, SCFGError
from ..diagnostics import Recorder
from ..integration import enable, guidance
from .methods import METHODS

__all__ = ["METHODS", "Job", "merge_manifests", "plan_jobs", "read_manifest", "run_generation"]


@dataclass(frozen=True)
class Job:
    prompt_index: int
    image_index: int
    prompt: str
    seed: int
    method: str
    scale: float

    @property
    def relpath(self) -> str:
        return f"images/{self.method}/g{self.scale:g}/{self.prompt_index:05d}_{self.image_index}.png"


def seed_for(prompt_index: int, image_index: int, base_seed: int = 0) -> int:
    return base_seed + prompt_index * 1009 + image_index


def plan_jobs(
    prompts: list[str], methods: list[str], scales: list[float], images_per_prompt: int, base_seed: int = 0
) -> list[Job]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SCFGError(f"Expected methods from {sorted(METHODS)}, but got {unknown}.")
    return [
        Job(p, k, prompt, seed_for(p, k, base_seed), method, float(scale))
        for method in methods
        for scale in scales
        for p, prompt in enumerate(prompts)
        for k in range(images_per_prompt)
    ]


def read_manifest(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _done(run: Path) -> set[str]:
    done = set()
    for manifest in run.glob("manifest*.jsonl"):
        for row in read_manifest(manifest):
            if (run / row["path"]).exists():
                done.add(row["path"])
    return done


def merge_manifests(run: Path) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for manifest in sorted(run.glob("manifest-*.jsonl")):
        for row in read_manifest(manifest):
            rows[row["path"]] = row
    merged = sorted(rows.values(), key=lambda r: (r["method"], r["scale"], r["prompt_index"], r["image_index"]))
    (run / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in merged))
    return merged


def _generate_batch(
    pipe: Any, jobs: list[Job], steps: int, run: Path, extra: dict[str, Any], config: SCFGConfig
) -> list[dict]:
    method, scale = jobs[0].method, jobs[0].scale
    recorder = Recorder()
    started = time.time()
    with guidance(pipe, scale) as arguments, enable(pipe, config, on_step=recorder):
        images = pipe(
            [j.prompt for j in jobs],
            **arguments,
            num_inference_steps=steps,
            generator=[torch.Generator("cpu").manual_seed(j.seed) for j in jobs],
            **extra,
        ).images
    seconds = (time.time() - started) / len(jobs)
    rows = []
    for i, (job, image) in enumerate(zip(jobs, images, strict=True)):
        path = run / job.relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        steps_ = recorder.steps
        rate = [float(r.rate_map[i].mean()) for r in steps_] if method != "cfg" else [1.0]
        rows.append(
            {
                **asdict(job),
                "path": job.relpath,
                "seconds": round(seconds, 3),
                "effective_scale": scale * float(np.mean(rate)) if steps_ else scale,
                "spread_before": float(np.mean([float(r.norm_spread()[i]) for r in steps_])) if steps_ else None,
                "spread_after": float(np.mean([float(r.norm_spread(after=method != "cfg")[i]) for r in steps_]))
                if steps_
                else None,
            }
        )
    return rows


def run_generation(
    pipe: Any,
    prompts: list[str],
    run: str | Path,
    methods: list[str] = ("cfg", "scfg-official"),
    scales: list[float] = (3.0, 5.0, 7.5),
    images_per_prompt: int = 1,
    steps: int = 30,
    batch_size: int = 8,
    base_seed: int = 0,
    pipeline_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    levels: tuple[int, ...] | None = None,
) -> list[dict[str, Any]]:
    """Generate the missing images of the run on this process's share of the jobs; return the merged manifest
    (rank 0) or this process's rows. `levels`: S-CFG's `levels` for every method (None: each preset's own; a demo
    model's are `scfg.demo.demo_domain(folder).levels`)."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    state = PartialState(cpu=not torch.cuda.is_available())  # CPU-only: gloo processes (torchrun/accelerate)
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    jobs = plan_jobs(list(prompts), list(methods), list(scales), images_per_prompt, base_seed)
    configs = {m: METHODS[m] if levels is None else replace(METHODS[m], levels=tuple(levels)) for m in methods}
    done = _done(run)
    todo = [j for j in jobs if j.relpath not in done]
    # Every process must split the same list: none may start writing before all have read what is done.
    state.wait_for_everyone()
    manifest = run / f"manifest-{state.process_index}.jsonl"
    written: list[dict[str, Any]] = []
    with state.split_between_processes(todo) as mine:
        bar = tqdm(total=len(mine), disable=not progress or not state.is_local_main_process, desc="images")
        groups: dict[tuple[str, float], list[Job]] = {}
        for job in mine:
            groups.setdefault((job.method, job.scale), []).append(job)
        for group in groups.values():
            for start in range(0, len(group), batch_size):
                chunk = group[start : start + batch_size]
                rows = _generate_batch(pipe, chunk, steps, run, pipeline_kwargs or {}, configs[chunk[0].method])
                with manifest.open("a") as f:  # one line per image, flushed: a killed run resumes here
                    f.writelines(json.dumps(r) + "\n" for r in rows)
                written.extend(rows)
                bar.update(len(rows))
        bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        return merge_manifests(run)
    return written
