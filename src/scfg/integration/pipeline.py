"""S-CFG on stock diffusers pipelines, with no forked pipeline code.

Three reversible hooks do the work, all removed on exit from the `with` block (also when the pipeline raises):

1. forward pre-hooks on the attention layers the config needs (`AttentionCapture`);
2. a forward pre-hook and a forward hook on the denoiser: the pre-hook decides whether this pass is guided
   (CFG active, step inside `[start_fraction, stop_fraction)`) and starts the capture; the forward hook builds
   the masks, computes the rate map, and rewrites the conditional half of the prediction as
   `pred_uncond + rate * score`, so that the pipeline's own `pred_uncond + g * (pred_cond - pred_uncond)` yields
   `pred_uncond + g * rate * score`;
3. the pipeline's class is swapped for a same-named subclass whose `__call__` notes each call's prompts,
   `num_images_per_prompt` and guidance scale (for `region_tokens="words"`, token strings in diagnostics, and
   pipelines such as DeepFloyd IF that keep the scale in a local variable); the class is swapped back on exit.

The step boundary is the denoiser's forward pass itself; nothing counts calls.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..capture import AttentionCapture, CapturedPass, grid_for, level_grid
from ..config import PRESETS, SCFGConfig, SCFGError
from ..diagnostics import StepReport
from ..families import LayerPair, ModelFamily, family_for
from ..rule import semantic_guidance
from ..segment import assign_regions, average_layer_maps, foreground_mask
from ..tokens import WordScale, token_scale_tensor

__all__ = ["SemanticGuidance", "enable"]

logger = logging.getLogger(__name__)


@dataclass
class _PromptInfo:
    """Token ids of one pipeline call's prompts, repeated per image: `[B, T]`."""

    token_ids: torch.Tensor
    word_mask: torch.Tensor
    tokens: list[list[str]]


@dataclass
class _Regions:
    """The masks of the last step that computed them, kept for `mask_interval > 1`."""

    step: int
    latent_hw: tuple[int, int]
    batch: int
    token_masks: torch.Tensor
    foreground: torch.Tensor


def _stack_of(layer: str) -> str:
    """The attention stack (`Transformer2DModel`) a UNet layer belongs to; a layer outside one is its own."""
    return layer.rsplit(".transformer_blocks.", 1)[0] if ".transformer_blocks." in layer else layer


def _last_per_group(pairs: list[LayerPair], key: Callable[[LayerPair], Any], k: int | None) -> list[LayerPair]:
    """Keep the last `k` pairs (forward order) of each group; all when `k` is None."""
    if k is None:
        return pairs
    groups: dict[Any, list[LayerPair]] = {}
    for pair in pairs:
        groups.setdefault(key(pair), []).append(pair)
    return [pair for pair in pairs if pair in groups[key(pair)][-k:]]


def enable(
    pipe: Any,
    config: SCFGConfig | str | None = None,
    *,
    on_step: Callable[[StepReport], None] | None = None,
    token_scales: Mapping[str, float] | Sequence[WordScale] | None = None,
) -> SemanticGuidance:
    """Apply S-CFG to `pipe` inside a `with` block.

    Args:
        pipe: a diffusers pipeline of a supported family (StableDiffusion 1.x/2.x pipelines).
        config (`SCFGConfig` or `str`, *optional*): the config, or a preset name (`"official"`, `"paper"`).
            Defaults to the `"official"` preset.
        on_step (`Callable[[StepReport], None]`, *optional*): called after every guided step with CPU tensors,
            e.g. a `scfg.Recorder()`. Costs a device-to-host copy per step; leave `None` for speed.
        token_scales (*optional*): per-word guidance multipliers, `{"cat": 1.5}` (every occurrence) or the
            `WordScale`s of `scfg.parse_weighted_prompt("a cat:1.5 on a sofa")`. They act on the regions those
            words' tokens own, after the clamps (`config.token_scale_mode`: multiply or replace the rate).
            A word that is in none of the prompts raises `SCFGError` listing the prompt's words.

    Example:
        ```py
        with scfg.enable(pipe):
            image = pipe("a red cube on a blue sphere", guidance_scale=7.5).images[0]
        ```
    """
    return SemanticGuidance(pipe, config, on_step=on_step, token_scales=token_scales)


class SemanticGuidance:
    """Context manager that applies S-CFG to a stock diffusers pipeline; see `enable`."""

    def __init__(
        self,
        pipe: Any,
        config: SCFGConfig | str | None = None,
        *,
        on_step: Callable[[StepReport], None] | None = None,
        token_scales: Mapping[str, float] | Sequence[WordScale] | None = None,
    ) -> None:
        self.token_scales = token_scales or None
        self.family: ModelFamily = family_for(pipe)
        if config is None:
            config = "official"
        if isinstance(config, str):
            # A preset by name is the family's version of it (e.g. DeepFloyd IF's per-stage differences).
            overrides = self.family.preset_overrides(pipe).get(config, {}) if config in PRESETS else {}
            config = SCFGConfig.preset(config, **overrides)
        elif not isinstance(config, SCFGConfig):
            raise SCFGError(f"Expected `config` as an SCFGConfig or a preset name, but got {type(config).__name__}.")
        self.pipe = pipe
        self.config = config
        self.on_step = on_step
        self.denoiser: nn.Module = self.family.denoiser(pipe)
        self.levels: tuple[int, ...] = config.levels or self.family.default_levels
        self.pairs = self._select_pairs(self.family.layer_pairs(self.denoiser))
        layers = list(dict.fromkeys([p.cross for p in self.pairs] + [p.self_attn for p in self.pairs if p.self_attn]))
        self._capture = AttentionCapture(self.denoiser, layers, self.family.probs_fn)
        self._channels = self.family.guided_channels(self.denoiser)
        self._stack: ExitStack | None = None
        self._prompt: _PromptInfo | None = None
        self._step: tuple[int | None, float, float] | None = None
        self._call_scale: float | None = None
        self._scales: torch.Tensor | None = None
        self._call_prompts: tuple[list[str] | None, int] = (None, 1)
        self._regions: _Regions | None = None
        self._reuse = False
        self._warned: set[str] = set()

    def _select_pairs(self, pairs: list[LayerPair]) -> list[LayerPair]:
        available = sorted({p.level for p in pairs})
        missing = [level for level in self.levels if level not in available]
        if missing:
            raise SCFGError(
                f"Expected cross-attention at latent/{missing[0]} for `levels={self.levels}`, but this "
                f"{type(self.denoiser).__name__} has cross-attention only at levels {available}. Pass "
                f"`levels=` with some of {available}."
            )
        chosen = [p for p in pairs if p.level in self.levels]  # families list pairs in forward order
        chosen = _last_per_group(chosen, lambda pair: _stack_of(pair.cross), self.config.layers_per_stack)
        return _last_per_group(chosen, lambda pair: pair.level, self.config.layers_per_level)

    # -- entering and leaving ---------------------------------------------------------------------------------

    def __enter__(self) -> SemanticGuidance:
        if self._stack is not None:
            raise SCFGError("Expected a fresh `scfg.enable(...)` context, but this one is already entered.")
        for hook in list(self.denoiser._forward_pre_hooks.values()):
            if isinstance(getattr(hook, "__self__", None), SemanticGuidance):
                raise SCFGError(
                    f"Expected S-CFG to be off on this {type(self.denoiser).__name__}, but another `scfg.enable` "
                    "context is active on it (maybe through another pipeline sharing it). Leave that one first."
                )
        stack = ExitStack()
        try:
            stack.enter_context(self._capture)
            stack.callback(self.denoiser.register_forward_pre_hook(self._begin_pass, with_kwargs=True).remove)
            stack.callback(self.denoiser.register_forward_hook(self._finish_pass, with_kwargs=True).remove)
            self._wrap_call(stack)
            stack.callback(self._reset)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc_info: object) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def _reset(self) -> None:
        self._prompt = None
        self._step = None
        self._call_scale = None
        self._scales = None
        self._call_prompts = (None, 1)
        self._regions = None
        self._reuse = False

    def _wrap_call(self, stack: ExitStack) -> None:
        """Observe each pipeline call's arguments through a same-named subclass, swapped back on exit.

        `pipe(...)` looks `__call__` up on the type, so an instance attribute cannot intercept it. The call's
        arguments give the prompts (token strings, `region_tokens="words"`), `num_images_per_prompt`, and the
        guidance scale of pipelines that keep it in a local variable (DeepFloyd IF).
        """
        pipe, original_cls = self.pipe, type(self.pipe)
        if not callable(pipe):  # a bare holder of the denoiser (e.g. in benchmarks): no calls to observe
            return
        signature = inspect.signature(original_cls.__call__)
        guard = self

        def __call__(pipeline: Any, *args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(pipeline, *args, **kwargs)
            bound.apply_defaults()
            guard._begin_call(bound.arguments)
            return original_cls.__call__(pipeline, *args, **kwargs)

        observed = type(
            original_cls.__name__, (original_cls,), {"__call__": __call__, "__module__": original_cls.__module__}
        )
        observed.__qualname__ = original_cls.__qualname__
        object.__setattr__(pipe, "__class__", observed)
        stack.callback(object.__setattr__, pipe, "__class__", original_cls)

    def _begin_call(self, arguments: dict[str, Any]) -> None:
        prompt = arguments.get("prompt")
        if self.token_scales is not None and prompt is None:
            raise SCFGError(
                "Expected a text `prompt` with `token_scales`, but got none (prompt_embeds?). Per-word scales need "
                "the prompt's words."
            )
        prompts = None if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
        self._call_prompts = (prompts, int(arguments.get("num_images_per_prompt") or 1))
        self._prompt = None
        self._scales = None
        self._regions = None
        scale = arguments.get("guidance_scale")
        self._call_scale = float(scale) if isinstance(scale, int | float) else None

    def _prepare_prompt(self, num_tokens: int) -> None:
        """Tokenise the call's prompts to the text length the denoiser sees (77 for CLIP, 300 for PixArt...)."""
        prompts, n = self._call_prompts
        if prompts is None or (self._prompt is not None and self._prompt.token_ids.shape[1] == num_tokens):
            return
        segments = self.family.tokenize(self.pipe, prompts, num_tokens)
        if not segments:
            return
        ids = torch.cat([part for _, part in segments], dim=1)
        words = torch.cat(
            [~torch.isin(part, torch.tensor(sorted(set(tok.all_special_ids)))) for tok, part in segments], dim=1
        )
        tokens = [
            [t for tok, part in segments for t in tok.convert_ids_to_tokens(part[row].tolist())]
            for row in range(len(prompts))
        ]
        self._prompt = _PromptInfo(
            token_ids=ids.repeat_interleave(n, dim=0),
            word_mask=words.repeat_interleave(n, dim=0),
            tokens=[t for t in tokens for _ in range(n)],
        )
        if self.token_scales is not None:
            self._scales = token_scale_tensor(segments, prompts, self.token_scales).repeat_interleave(n, dim=0)

    # -- one denoiser pass ------------------------------------------------------------------------------------

    def _begin_pass(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._capture.finish()
        self._step = None
        self._reuse = False
        guidance_scale = self._guidance_scale()
        if guidance_scale is None:
            return
        prompts, n = self._call_prompts
        batch = self.family.batch_size(args, kwargs)
        if prompts is not None and batch != 2 * len(prompts) * n:
            # An extra pass that is not the CFG batch (e.g. SD3's skip-layer guidance on cond only): leave it alone.
            return
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        step, num_steps = self._step_index(timestep)
        if step is not None and num_steps:
            fraction = step / num_steps
            if not self.config.start_fraction <= fraction < self.config.stop_fraction:
                return
        self._step = (
            step,
            float(torch.as_tensor(timestep).flatten()[0]) if timestep is not None else 0.0,
            guidance_scale,
        )
        latent_hw = self.family.latent_hw(args, kwargs)
        self._reuse = self._can_reuse(step, latent_hw, batch)
        if not self._reuse:
            self._capture.begin(latent_hw)

    def _can_reuse(self, step: int | None, latent_hw: tuple[int, int], batch: int) -> bool:
        """Whether this step may reuse the last computed regions (`mask_interval > 1`, same call and shapes)."""
        regions = self._regions
        return (
            self.config.mask_interval > 1
            and regions is not None
            and step is not None
            and 0 < step - regions.step < self.config.mask_interval
            and regions.latent_hw == tuple(latent_hw)
            and regions.batch == batch
        )

    def _guidance_scale(self) -> float | None:
        """The scale of the running call if it does CFG, else None (plain sampling, or no pipeline call)."""
        try:
            if not self.pipe.do_classifier_free_guidance:
                return None
            return float(self.pipe.guidance_scale)
        except AttributeError:  # pipelines that keep them local: CFG iff guidance_scale > 1
            scale = self._call_scale
            return scale if scale is not None and scale > 1.0 else None

    def _step_index(self, timestep: Any) -> tuple[int | None, int]:
        timesteps = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
        if timestep is None or timesteps is None or len(timesteps) == 0:
            return None, 0
        t = torch.as_tensor(timestep).flatten()[0].to(timesteps.device, timesteps.dtype)
        match = (timesteps == t).nonzero()
        return (int(match[0, 0]) if len(match) else None), len(timesteps)

    def _finish_pass(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        captured = self._capture.finish()
        if self._step is None or (captured is None and not self._reuse):
            return output
        is_tuple = isinstance(output, tuple)
        pred = output[0] if is_tuple else output.sample
        new_pred = self._guide(pred, captured)
        if is_tuple:
            return (new_pred, *output[1:])
        output.sample = new_pred
        return output

    def _guide(self, pred: torch.Tensor, captured: CapturedPass | None) -> torch.Tensor:
        step, timestep, guidance_scale = self._step  # type: ignore[misc]
        config = self.config
        if pred.shape[0] % 2:
            raise SCFGError(
                f"Expected the CFG batch [uncond, cond] to have an even size, but the denoiser returned "
                f"{pred.shape[0]} samples."
            )
        if captured is None:  # `mask_interval > 1`: this step reuses the last regions and captured nothing
            token_masks, fg_mask = self._regions.token_masks, self._regions.foreground  # type: ignore[union-attr]
        else:
            regions = self._regions_from(captured)
            if regions is None:
                return pred
            token_masks, fg_mask = regions
            if step is not None and config.mask_interval > 1:
                self._regions = _Regions(step, tuple(captured.latent_hw), pred.shape[0], token_masks, fg_mask)
        pred_uncond, pred_cond = self.family.split_cfg_batch(pred)
        # Learned-variance channels (DeepFloyd IF) are split off before guidance and pass through unchanged.
        c = self._channels or pred.shape[1]
        eps_uncond, eps_cond = pred_uncond[:, :c], pred_cond[:, :c]
        matches = self._matches_prompt(token_masks.shape[:2])
        result = semantic_guidance(
            eps_uncond,
            eps_cond,
            token_masks,
            fg_mask,
            guidance_scale,
            benchmark=config.benchmark,
            rate_clamp=config.rate_clamp,
            max_effective_scale=config.max_effective_scale,
            smoothing=config.rate_map_smoothing,
            token_scales=self._scales if matches else None,
            token_scale_mode=config.token_scale_mode,
        )
        if not torch.isfinite(result.rate_map).all():
            self._warn_once("nonfinite_rate", "The S-CFG rate map was not finite; this step uses plain CFG.")
            return pred
        if getattr(self.pipe, "guidance_rescale", 0.0) > 0.0:
            self._warn_once(
                "rescale",
                "`guidance_rescale` > 0: the pipeline rescales against the rewritten conditional prediction "
                "(uncond + rate * score), not the original one.",
            )
        # The pipeline computes uncond + g * (cond' - uncond); this cond' makes that uncond + g * rate * score.
        dtype = result.rate_map.dtype
        new_eps = eps_uncond.to(dtype) + result.rate_map * (eps_cond.to(dtype) - eps_uncond.to(dtype))
        new_cond = torch.cat([new_eps.to(pred.dtype), pred_cond[:, c:]], dim=1)
        if self.on_step is not None:
            self.on_step(
                StepReport(
                    step=step,
                    timestep=timestep,
                    guidance_scale=guidance_scale,
                    token_masks=token_masks.bool().cpu(),
                    foreground_mask=fg_mask.bool().cpu(),
                    rate_map=result.rate_map.cpu(),
                    token_rates=result.token_rates.cpu(),
                    region_norms=result.region_norms.cpu(),
                    benchmark_norm=result.benchmark_norm.cpu(),
                    tokens=self._prompt.tokens if matches else None,  # type: ignore[union-attr]
                )
            )
        return self.family.join_cfg_batch(pred_uncond, new_cond)

    def _regions_from(self, captured: CapturedPass) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Token masks `[B, T, h, w]` and foreground `[B, 1, h, w]` of the guided half from this pass's maps;
        None (with a warning) when the maps are not finite."""
        config = self.config
        captured.require(self._capture.layers)
        latent_hw = captured.latent_hw
        mask_grid = level_grid(latent_hw, min(self.levels))
        layers = []
        for pair in self.pairs:
            grid = grid_for(captured.probs[pair.cross].shape[1], latent_hw)
            if grid != level_grid(latent_hw, pair.level):
                raise SCFGError(
                    f"Expected layer `{pair.cross}` at latent/{pair.level} of the {latent_hw[0]}x{latent_hw[1]} "
                    f"latent, but its {captured.probs[pair.cross].shape[1]} queries form a {grid[0]}x{grid[1]} grid."
                )
            cross, self_probs = self.family.layer_inputs(pair, captured.probs)
            layers.append((cross, self_probs, grid))
        captured.probs.clear()
        # Which token plays the start token's role, and which tokens are real (not masked padding): family-specific.
        reference, valid = self.family.token_roles(layers[0][0])
        token_maps, fg_maps = average_layer_maps(
            layers, mask_grid, config.completion, config.completion_order, config.token_map_smoothing, reference
        )
        del layers
        self._prepare_prompt(token_maps.shape[1])
        halves = dict(zip(("uncond", "cond"), self.family.split_cfg_batch(token_maps), strict=True))
        fg_halves = dict(zip(("uncond", "cond"), self.family.split_cfg_batch(fg_maps), strict=True))
        token_src, fg_src = halves[config.token_source], fg_halves[config.foreground_source]
        if not (torch.isfinite(token_src).all() and torch.isfinite(fg_src).all()):
            self._warn_once(
                "nonfinite",
                "Attention maps were not finite (overflow in half precision?); this step uses plain CFG.",
            )
            return None

        allowed = self._allowed_tokens(token_src.shape[0], token_src.shape[1])
        if valid is not None:
            valid_src = dict(zip(("uncond", "cond"), self.family.split_cfg_batch(valid), strict=True))[
                config.token_source
            ]
            allowed = valid_src if allowed is None else allowed & valid_src
        return assign_regions(token_src, allowed, config.tie_break), foreground_mask(fg_src)

    def _matches_prompt(self, shape: tuple[int, int] | torch.Size) -> bool:
        return self._prompt is not None and tuple(self._prompt.token_ids.shape) == tuple(shape)

    def _allowed_tokens(self, batch: int, num_tokens: int) -> torch.Tensor | None:
        if self.config.region_tokens == "all":
            return None
        if not self._matches_prompt((batch, num_tokens)):
            self._warn_once(
                "words",
                "`region_tokens='words'` needs a text prompt (not `prompt_embeds`) of the tokenizer's length; "
                "every token position may own a region instead.",
            )
            return None
        words = self._prompt.word_mask  # type: ignore[union-attr]
        # A prompt with no words (empty string) keeps every token so that each pixel still has a region.
        return torch.where(words.any(dim=1, keepdim=True), words, torch.ones_like(words)).to(self._device())

    def _device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)
