"""S-CFG on stock diffusers pipelines, with no forked pipeline code.

Three reversible hooks do the work, all removed on exit from the `with` block (also when the pipeline raises):

1. forward pre-hooks on the attention layers the config needs (`AttentionCapture`);
2. a forward pre-hook and a forward hook on the denoiser: the pre-hook decides whether this pass is guided
   (CFG active, step inside `[start_fraction, stop_fraction)`) and starts the capture; the forward hook builds
   the masks, computes the guided prediction `pred_uncond + g * rate * score` and rewrites the unconditional
   half so that the pipeline's own `pred_uncond + g * (pred_cond - pred_uncond)` yields it (`express_guided`); the
   conditional half stays the model's own, so what the pipeline does with it after its CFG line
   (`guidance_rescale`, SD3's skip-layer guidance) sees the original conditional prediction;
3. the pipeline's class is swapped for a same-named subclass whose `__call__` opens the call's state (`_Call`:
   prompts, `num_images_per_prompt`, guidance scale, step counter, reusable regions) and drops it when the call
   returns or raises; the class is swapped back on exit.

Only passes of the CFG batch inside a call of the enabled pipeline are guided: another pipeline sharing the
denoiser, or a direct `pipe.unet(...)` call inside the block, is left alone. The step boundary is the denoiser's
forward pass itself; nothing counts calls.
"""

from __future__ import annotations

import inspect
import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..capture import AttentionCapture, CapturedPass, grid_for, level_grid
from ..config import SCFGConfig, SCFGError
from ..diagnostics import StepReport
from ..families import LayerPair, ModelFamily, family_for
from ..rule import semantic_guidance
from ..segment import assign_regions, average_layer_maps, foreground_mask
from ..tokens import WordScale, token_scale_tensor, validate_token_scales

__all__ = ["SemanticGuidance", "enable", "express_guided", "resolve_config"]

logger = logging.getLogger(__name__)


@dataclass
class _PromptInfo:
    """Token ids of one pipeline call's prompts, repeated per image: `[B, T]`."""

    token_ids: torch.Tensor
    word_mask: torch.Tensor
    tokens: list[list[str]]


@dataclass
class _Call:
    """What one call of the enabled pipeline asked for, and what S-CFG keeps between its steps.

    Created when the call starts and dropped when it ends (returns or raises), so nothing carries over to a
    later call, to another pipeline sharing the denoiser, or to a direct denoiser call outside a pipeline call.
    """

    prompts: list[str] | None = None
    images_per_prompt: int = 1
    guidance_scale: float | None = None  # from the call's arguments (pipelines that keep it local: IF)
    prompt: _PromptInfo | None = None
    token_scales: torch.Tensor | None = None
    regions: _Regions | None = None
    last_step: int = -1  # the last step index reported, for schedulers that repeat timesteps (PNDM, Heun)


@dataclass
class _Pass:
    """The denoiser pass being guided: its step, timestep and scale, and whether it reuses the last regions."""

    step: int | None
    timestep: float
    guidance_scale: float
    reuse: bool = False


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


def resolve_config(pipe: Any, config: SCFGConfig | str | None = None) -> SCFGConfig:
    """Return the config S-CFG uses on `pipe`: every `"auto"` field set to the model family's value for the preset
    (or the preset's own), every field the user set kept.

    `scfg.enable(pipe, config).config` is this; the CLI, the web UI, `scfg eval` and the compositional benchmark
    all pass their configs through it, so a family's preset differences reach every caller.
    """
    family = family_for(pipe)
    if config is None:
        config = "official"
    if isinstance(config, str):
        config = SCFGConfig.preset(config)
    elif not isinstance(config, SCFGConfig):
        raise SCFGError(
            f"Expected `config` as an SCFGConfig or a preset name ('official', 'paper'), but got "
            f"{type(config).__name__}."
        )
    return config.resolve(family.preset_overrides(pipe))


def enable(
    pipe: Any,
    config: SCFGConfig | str | None = None,
    *,
    on_step: Callable[[StepReport], None] | None = None,
    token_scales: Mapping[str, float] | Sequence[WordScale] | None = None,
) -> SemanticGuidance:
    """Apply S-CFG to `pipe` inside a `with` block.

    Args:
        pipe: a diffusers pipeline of a supported family (see the README's family table).
        config (`SCFGConfig` or `str`, *optional*): the config, or a preset name (`"official"`, `"paper"`).
            Defaults to the `"official"` preset. Fields left `"auto"` take the model family's value.
        on_step (`Callable[[StepReport], None]`, *optional*): called after every guided step with CPU tensors,
            e.g. a `scfg.Recorder()`. Costs a device-to-host copy per step; leave `None` for speed.
        token_scales (*optional*): per-word guidance multipliers, `{"cat": 1.5}` (every occurrence) or the
            `WordScale`s of `scfg.parse_weighted_prompt("a cat:1.5 on a sofa")`. They act on the regions those
            words' tokens own, after the clamps (`config.token_scale_mode`: multiply or replace the rate).
            A word that is in none of the prompts raises `SCFGError` listing the prompt's words.

    Only calls of `pipe` made inside the `with` block are guided; the object does nothing until it is entered.

    Example:
        ```py
        with scfg.enable(pipe):
            image = pipe("a red cube on a blue sphere", guidance_scale=7.5).images[0]
        ```
    """
    return SemanticGuidance(pipe, config, on_step=on_step, token_scales=token_scales)


def express_guided(
    pred_uncond: torch.Tensor,
    pred_cond: torch.Tensor,
    guided: torch.Tensor,
    guidance_scale: float,
    guidance_rescale: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Return `(pred_uncond', pred_cond', exact)` such that the pipeline's own CFG line
    `pred_uncond' + g * (pred_cond' - pred_uncond')` yields `guided`.

    The conditional prediction is kept and the unconditional one rewritten: with `k = (g·rate - 1) / (g - 1)`,
    `guided = u + g·rate·η` is `c + (g·rate - 1)·η`, so `u' = c - k·η` gives `u' + g(c - u') = guided`. Whatever
    the pipeline does with `pred_cond` after that line (`guidance_rescale` against the conditional prediction, as
    the released code does; SD3's skip-layer guidance) then sees the model's own prediction.

    In the model's dtype the pipeline's `g·(c - u')` carries the rounding of `u'` (about `ulp(|u'|)`) times `g`,
    which dwarfs the guidance when `g` is huge (the rate is `15/g` above 18.75) or `g` is barely above 1 (`k`
    explodes). The line is therefore simulated in the pipeline's dtype; if it misses `guided` by more than 64 ulps
    of the prediction's largest value (plain CFG's own line is off by a few), both halves are set to the guided
    prediction instead, which the line reproduces exactly (`t + g·0 = t`); `guidance_rescale` (Lin et al.) is then
    applied here, against the original conditional prediction, because the pipeline's own rescale is the identity on
    equal halves. `exact` is False in that case.

    Args:
        pred_uncond, pred_cond (`torch.Tensor`): `[B, C, ...]` the model's predictions (guided channels only).
        guided (`torch.Tensor`): `[B, C, ...]` the target, float32 or wider.
        guidance_scale (`float`): `g > 1`.
        guidance_rescale (`float`): the pipeline's `guidance_rescale` (only read when both halves are replaced).

    >>> u, c = torch.zeros(1, 2, 1, 1), torch.ones(1, 2, 1, 1)
    >>> nu, nc, exact = express_guided(u, c, u + 5.0 * 0.8 * (c - u), 5.0)
    >>> torch.allclose(nu + 5.0 * (nc - nu), torch.full_like(u, 4.0)), exact, nc is c
    (True, True, True)
    """
    dtype = guided.dtype
    cond = pred_cond.to(dtype)
    # guided = c + (g·rate - 1)·η; the per-pixel factor on η is recovered from the target itself
    k = (guided - cond) / (guidance_scale - 1.0)
    new_uncond = (cond - k).to(pred_uncond.dtype)
    line = new_uncond + guidance_scale * (pred_cond - new_uncond)  # the pipeline's line, in its own dtype
    eps = torch.finfo(pred_cond.dtype).eps
    error = (line.to(dtype) - guided).abs().amax()
    if bool(error <= 64 * eps * guided.abs().amax()):
        return new_uncond, pred_cond, True
    if guidance_rescale > 0:  # Lin et al. 2305.08891, eq. 15-16, against the model's conditional prediction
        dims = list(range(1, guided.ndim))
        rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
        guided = guidance_rescale * rescaled + (1 - guidance_rescale) * guided
    both = guided.to(pred_cond.dtype)
    return both, both, False


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
        if on_step is not None and not callable(on_step):
            raise SCFGError(
                f"Expected `on_step` to be callable (e.g. `scfg.Recorder()`), but got {type(on_step).__name__}."
            )
        self.token_scales = validate_token_scales(token_scales) if token_scales else None
        self.family: ModelFamily = family_for(pipe)
        self.pipe = pipe
        self.config = resolve_config(pipe, config)
        self.on_step = on_step
        self.denoiser: nn.Module = self.family.denoiser(pipe)
        self.levels: tuple[int, ...] = self.config.levels or self.family.default_levels
        self.pairs = self._select_pairs(self.family.layer_pairs(self.denoiser))
        layers = list(dict.fromkeys([p.cross for p in self.pairs] + [p.self_attn for p in self.pairs if p.self_attn]))
        self._capture = AttentionCapture(self.denoiser, layers, self.family.probs_fn)
        self._channels = self.family.guided_channels(self.denoiser)
        self._stack: ExitStack | None = None
        self._call: _Call | None = None  # the running call of the enabled pipeline, if any
        self._pass: _Pass | None = None  # the denoiser pass being guided, if any
        self._warned: set[str] = set()
        self._entered_once = False  # set last: a constructor that raised has nothing to warn about

    def __del__(self) -> None:
        if not getattr(self, "_entered_once", True):
            warnings.warn(
                "`scfg.enable(pipe)` was never entered, so it guided nothing: use it as `with scfg.enable(pipe): "
                "...`.",
                RuntimeWarning,
                stacklevel=2,
            )

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
        self._entered_once = True
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
        self._call = None
        self._pass = None

    def _wrap_call(self, stack: ExitStack) -> None:
        """Open a `_Call` for each call of the pipeline through a same-named subclass, swapped back on exit.

        `pipe(...)` looks `__call__` up on the type, so an instance attribute cannot intercept it. The call's
        arguments give the prompts (token strings, `region_tokens="words"`), `num_images_per_prompt`, and the
        guidance scale of pipelines that keep it in a local variable (DeepFloyd IF). A holder that is not
        callable (a bare denoiser holder, as in the benchmarks) has one call for the whole block.
        """
        pipe, original_cls = self.pipe, type(self.pipe)
        if not callable(pipe):
            self._call = _Call()
            return
        signature = inspect.signature(original_cls.__call__)
        guard = self

        def __call__(pipeline: Any, *args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(pipeline, *args, **kwargs)
            bound.apply_defaults()
            outer = guard._call
            guard._call = guard._begin_call(bound.arguments)
            try:
                return original_cls.__call__(pipeline, *args, **kwargs)
            finally:
                guard._capture.finish()
                guard._call, guard._pass = outer, None

        def __reduce_ex__(pipeline: Any, protocol: Any) -> Any:
            raise SCFGError(
                f"Expected a {original_cls.__name__} outside `scfg.enable(...)`, but this one is inside its `with` "
                "block: a copy or pickle would carry S-CFG's hooks. Copy or pickle it before or after the block."
            )

        observed = type(
            original_cls.__name__,
            (original_cls,),
            {"__call__": __call__, "__reduce_ex__": __reduce_ex__, "__module__": original_cls.__module__},
        )
        observed.__qualname__ = original_cls.__qualname__
        object.__setattr__(pipe, "__class__", observed)
        stack.callback(object.__setattr__, pipe, "__class__", original_cls)

    def _begin_call(self, arguments: dict[str, Any]) -> _Call:
        """Check the call's arguments that S-CFG reads, at the door, and open its state."""
        prompt = arguments.get("prompt")
        if self.token_scales is not None and prompt is None:
            raise SCFGError(
                "Expected a text `prompt` with `token_scales`, but got none (prompt_embeds?). Per-word scales need "
                "the prompt's words."
            )
        prompts = None if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
        scale = arguments.get("guidance_scale")
        if isinstance(scale, int | float) and not isinstance(scale, bool) and math.isinf(scale) and scale > 0:
            raise SCFGError(
                f"Expected a finite `guidance_scale`, but got {scale!r}. S-CFG caps `g * rate` at "
                f"{self.config.max_effective_scale} anyway; pass a number such as 7.5."
            )
        return _Call(
            prompts=prompts,
            images_per_prompt=int(arguments.get("num_images_per_prompt") or 1),
            guidance_scale=float(scale) if isinstance(scale, int | float) else None,
        )

    def new_call(self) -> None:
        """Start the state of a new sampling run without a pipeline call to observe (the modular guider)."""
        self._entered_once = True
        self._call = _Call()
        self._pass = None

    def _prepare_prompt(self, call: _Call, num_tokens: int) -> None:
        """Tokenise the call's prompts, as the text encoder saw them, to the text length the denoiser sees (77 for
        CLIP, 300 for PixArt...)."""
        prompts, n = call.prompts, call.images_per_prompt
        if prompts is None or (call.prompt is not None and call.prompt.token_ids.shape[1] == num_tokens):
            return
        # Textual inversion: the pipeline expands a multi-vector token into several (`maybe_convert_prompt`).
        prompts = [self._convert(p) for p in prompts]
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
        call.prompt = _PromptInfo(
            token_ids=ids.repeat_interleave(n, dim=0),
            word_mask=words.repeat_interleave(n, dim=0),
            tokens=[t for t in tokens for _ in range(n)],
        )
        if self.token_scales is not None:
            scales = self._convert_scales(self.token_scales)
            call.token_scales = token_scale_tensor(segments, prompts, scales).repeat_interleave(n, dim=0)

    def _convert(self, text: str) -> str:
        """The prompt as the pipeline's text encoder gets it (textual-inversion tokens expanded)."""
        convert = getattr(self.pipe, "maybe_convert_prompt", None)
        tokenizer = getattr(self.pipe, "tokenizer", None)
        if convert is None or tokenizer is None:
            return text
        return convert(text, tokenizer)

    def _convert_scales(self, scales: Any) -> Any:
        """Per-word scales on a multi-vector textual-inversion token cover every one of its vectors' tokens."""
        items = [WordScale(w, float(v)) for w, v in scales.items()] if isinstance(scales, Mapping) else list(scales)
        out = []
        for item in items:
            pieces = self._convert(item.word).split()
            if len(pieces) > 1 and pieces[0] == item.word:
                out.extend(WordScale(piece, item.scale, item.occurrence) for piece in pieces)
            else:
                out.append(item)
        return out

    # -- one denoiser pass ------------------------------------------------------------------------------------

    def _begin_pass(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._capture.finish()
        self._pass = None
        call = self._call
        if call is None:  # not inside a call of the enabled pipeline: leave the denoiser alone
            return
        guidance_scale = self._guidance_scale(call)
        if guidance_scale is None:
            return
        batch = self.family.batch_size(args, kwargs)
        if call.prompts is not None and batch != 2 * len(call.prompts) * call.images_per_prompt:
            # An extra pass that is not the CFG batch (e.g. SD3's skip-layer guidance on cond only): leave it alone.
            return
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        step, num_steps = self._step_index(call, timestep)
        if step is not None and num_steps:
            fraction = step / num_steps
            if not self.config.start_fraction <= fraction < self.config.stop_fraction:
                return
        latent_hw = self.family.latent_hw(args, kwargs)
        self._pass = _Pass(
            step=step,
            timestep=float(torch.as_tensor(timestep).flatten()[0]) if timestep is not None else 0.0,
            guidance_scale=guidance_scale,
            reuse=self.can_reuse(step, latent_hw, batch),
        )
        if not self._pass.reuse:
            self._capture.begin(latent_hw)

    def can_reuse(self, step: int | None, latent_hw: tuple[int, int], batch: int) -> bool:
        """Whether this step may reuse the call's last computed regions (`mask_interval > 1`, same shapes)."""
        regions = self._call.regions if self._call is not None else None
        return (
            self.config.mask_interval > 1
            and regions is not None
            and step is not None
            and 0 < step - regions.step < self.config.mask_interval
            and regions.latent_hw == tuple(latent_hw)
            and regions.batch == batch
        )

    def _guidance_scale(self, call: _Call) -> float | None:
        """The scale of the running call if it does CFG, else None (plain sampling)."""
        try:
            if not self.pipe.do_classifier_free_guidance:
                return None
            scale = float(self.pipe.guidance_scale)
        except AttributeError:  # pipelines that keep them local: CFG iff guidance_scale > 1
            scale = call.guidance_scale
            if scale is None or not scale > 1.0:
                return None
        return scale if math.isfinite(scale) and scale > 1.0 else None

    def _step_index(self, call: _Call, timestep: Any) -> tuple[int | None, int]:
        """The index of this pass's step in the scheduler's timesteps, and their number.

        Schedulers that repeat a timestep (PNDM's warm-up, Heun's second stage) list it several times: the step is
        the first matching index after the last one reported in this call, so indices are the loop's own.
        """
        timesteps = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
        if timestep is None or timesteps is None or len(timesteps) == 0:
            return None, 0
        t = torch.as_tensor(timestep).flatten()[0].to(timesteps.device, timesteps.dtype)
        matches = (timesteps == t).nonzero().flatten().tolist()
        if not matches:
            return None, len(timesteps)
        later = [i for i in matches if i > call.last_step]
        step = later[0] if later else matches[0]
        call.last_step = step
        return step, len(timesteps)

    def _finish_pass(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        captured = self._capture.finish()
        current, self._pass = self._pass, None
        if current is None or (captured is None and not current.reuse):
            return output
        is_tuple = isinstance(output, tuple)
        pred = output[0] if is_tuple else output.sample
        new_pred = self.guide(pred, captured, current)
        if is_tuple:
            return (new_pred, *output[1:])
        output.sample = new_pred
        return output

    def guide(self, pred: torch.Tensor, captured: CapturedPass | None, current: _Pass) -> torch.Tensor:
        """Return the CFG batch `[uncond', cond]` whose CFG line yields S-CFG's guided prediction for this pass.

        `captured` holds the pass's attention maps (`None` when the pass reuses the call's last regions).
        """
        call = self._call if self._call is not None else _Call()
        step, guidance_scale = current.step, current.guidance_scale
        config = self.config
        if pred.shape[0] % 2:
            raise SCFGError(
                f"Expected the CFG batch [uncond, cond] to have an even size, but the denoiser returned "
                f"{pred.shape[0]} samples."
            )
        if captured is None:  # `mask_interval > 1`: this step reuses the last regions and captured nothing
            token_masks, fg_mask = call.regions.token_masks, call.regions.foreground  # type: ignore[union-attr]
        else:
            regions = self._regions_from(call, captured)
            if regions is None:
                return pred
            token_masks, fg_mask = regions
            if step is not None and config.mask_interval > 1:
                call.regions = _Regions(step, tuple(captured.latent_hw), pred.shape[0], token_masks, fg_mask)
        pred_uncond, pred_cond = self.family.split_cfg_batch(pred)
        # Learned-variance channels (DeepFloyd IF, PixArt) are split off before guidance and pass through unchanged.
        c = self._channels or pred.shape[1]
        eps_uncond, eps_cond = pred_uncond[:, :c], pred_cond[:, :c]
        matches = self._matches_prompt(call, token_masks.shape[:2])
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
            token_scales=call.token_scales if matches else None,
            token_scale_mode=config.token_scale_mode,
            out_dtype=torch.promote_types(pred.dtype, torch.float32),
        )
        if not (torch.isfinite(result.rate_map).all() and torch.isfinite(result.guided).all()):
            self._warn_once(
                "nonfinite_rate",
                "The S-CFG guided prediction was not finite (the model's predictions or the per-word scales "
                "overflow); this step uses plain CFG.",
            )
            return pred
        new_uncond, new_cond, exact = express_guided(
            eps_uncond, eps_cond, result.guided, guidance_scale, float(getattr(self.pipe, "guidance_rescale", 0.0))
        )
        if not exact:
            self._warn_once(
                "inexact",
                f"`guidance_scale={guidance_scale:g}` is too far from the scales S-CFG can pass through the "
                "pipeline's CFG line in this dtype; both CFG halves carry the guided prediction (SD3's skip-layer "
                "guidance then sees it instead of the conditional prediction).",
            )
        new_uncond = torch.cat([new_uncond, pred_uncond[:, c:]], dim=1)
        new_cond = torch.cat([new_cond, pred_cond[:, c:]], dim=1)
        if self.on_step is not None:
            self.on_step(
                StepReport(
                    step=step,
                    timestep=current.timestep,
                    guidance_scale=guidance_scale,
                    token_masks=token_masks.bool().cpu(),
                    foreground_mask=fg_mask.bool().cpu(),
                    rate_map=result.rate_map.cpu(),
                    token_rates=result.token_rates.cpu(),
                    region_norms=result.region_norms.cpu(),
                    benchmark_norm=result.benchmark_norm.cpu(),
                    tokens=call.prompt.tokens if matches else None,  # type: ignore[union-attr]
                )
            )
        return self.family.join_cfg_batch(new_uncond, new_cond)

    def _regions_from(self, call: _Call, captured: CapturedPass) -> tuple[torch.Tensor, torch.Tensor] | None:
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
        self._prepare_prompt(call, token_maps.shape[1])
        halves = dict(zip(("uncond", "cond"), self.family.split_cfg_batch(token_maps), strict=True))
        fg_halves = dict(zip(("uncond", "cond"), self.family.split_cfg_batch(fg_maps), strict=True))
        token_src, fg_src = halves[config.token_source], fg_halves[config.foreground_source]
        if not (torch.isfinite(token_src).all() and torch.isfinite(fg_src).all()):
            self._warn_once(
                "nonfinite",
                "Attention maps were not finite (overflow in half precision?); this step uses plain CFG.",
            )
            return None

        allowed = self._allowed_tokens(call, token_src.shape[0], token_src.shape[1])
        if valid is not None:
            valid_src = dict(zip(("uncond", "cond"), self.family.split_cfg_batch(valid), strict=True))[
                config.token_source
            ]
            allowed = valid_src if allowed is None else allowed & valid_src
        return assign_regions(token_src, allowed, config.tie_break), foreground_mask(fg_src)

    def _matches_prompt(self, call: _Call, shape: tuple[int, int] | torch.Size) -> bool:
        return call.prompt is not None and tuple(call.prompt.token_ids.shape) == tuple(shape)

    def _allowed_tokens(self, call: _Call, batch: int, num_tokens: int) -> torch.Tensor | None:
        if self.config.region_tokens == "all":
            return None
        if not self._matches_prompt(call, (batch, num_tokens)):
            self._warn_once(
                "words",
                "`region_tokens='words'` needs a text prompt (not `prompt_embeds`) of the tokenizer's length; "
                "every token position may own a region instead.",
            )
            return None
        words = call.prompt.word_mask  # type: ignore[union-attr]
        # A prompt with no words (empty string) keeps every token so that each pixel still has a region.
        return torch.where(words.any(dim=1, keepdim=True), words, torch.ones_like(words)).to(self._device())

    def _device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)
