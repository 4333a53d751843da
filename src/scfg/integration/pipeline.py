"""S-CFG on stock diffusers pipelines, with no forked pipeline code.

The hooks here only observe and deliver; what a step computes is `scfg.engine` (README, "How a step flows"):

1. `AttentionCapture` hooks on the attention layers the config needs: each layer's attention is handed over as soon
   as the layer has run, completed and folded into the pass's running maps (`engine.MapAccumulator`), then freed;
2. a forward pre-hook and a forward hook on each denoiser (`family.denoisers`: SD's `unet`, a transformer, Wan 2.2's
   two experts): the pre-hook reads the pipeline's CFG for this call (`family.cfg_layout`: one batch, or separate
   cond/uncond passes in a given order, the line and the scale), decides whether this pass is guided (CFG active,
   step inside `[start_fraction, stop_fraction)`) and starts the capture; the forward hook of the pass that
   completes a step (the batched pass, or the second of two separate passes) computes the regions and the guided
   prediction `u + a · rate · (c - u)` and rewrites the prediction that arrives last so that the pipeline's own line
   yields it (`engine.rewrite`); the conditional prediction stays the model's own wherever the layout allows, so
   what the pipeline does with it after its line (`guidance_rescale`, Qwen-Image's norm rescale, SD3's skip-layer
   guidance) sees the original;
3. the pipeline's class is swapped for a same-named subclass whose `__call__` opens the call's state (`_Call`:
   prompts, arguments, step counter, the first of a step's separate passes, reusable regions) and drops it when the
   call returns or raises; the class is swapped back on exit.

Only passes inside a call of the enabled pipeline are guided: another pipeline sharing the denoiser, or a direct
`pipe.unet(...)` call inside the block, is left alone. The step boundary is the denoiser's forward pass itself.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..attention import DEFAULT_BUDGET, AttentionRows
from ..capture import AttentionCapture, grid_for, level_grid
from ..config import PRESETS, SCFGConfig, SCFGError
from ..diagnostics import StepReport
from ..engine import CFGLayout, MapAccumulator, PassMaps, Regions, guided_prediction, rewrite, step_regions
from ..families import LayerPair, ModelFamily, PassContext, family_for
from ..tokens import WordScale, token_scale_tensor, validate_token_scales

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "SemanticGuidance",
    "enable",
    "express_guided",
    "guidance",
    "guidance_arguments",
    "resolve_config",
]

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_BUDGET = DEFAULT_BUDGET
"""Bytes of head-averaged attention rows S-CFG holds at once (256 MiB, `scfg.attention.AttentionRows`'s budget): a
layer's self-attention `[B, Q, Q]` up to this size is formed whole, once, a larger one in blocks of query rows for
each product. The scores are formed one head at a time, on the CPU at most 4 MiB at a time whatever the budget. The peak extra
memory of a layer's completion is `scfg.attention.peak_extra_bytes(...)`: about one block of rows plus three
`[B, Q, T]` products."""

Role = Literal["cond", "uncond"]


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
    grid: tuple[int, ...]
    samples: int
    regions: Regions


@dataclass
class _Pass:
    """The denoiser pass being observed: what it holds, its step and layout, and its running maps."""

    denoiser: str
    role: Literal["batch", "cond", "uncond"]
    layout: CFGLayout
    context: PassContext
    step: int | None
    timestep: float
    reuse: bool = False
    accumulator: MapAccumulator | None = None
    waiting: dict[str, AttentionRows] = field(default_factory=dict)  # layers of pairs not complete yet
    done: set[LayerPair] = field(default_factory=set)


@dataclass
class _Held:
    """The first of a step's two separate passes: its maps and its prediction (a view of the pipeline's tensor)."""

    denoiser: str
    step: int | None
    timestep: float
    role: Role
    guided: bool  # False: the step is outside [start, stop) and is left alone
    reuse: bool = False
    maps: PassMaps | None = None
    prediction: torch.Tensor | None = None


@dataclass
class _Call:
    """What one call of the enabled pipeline asked for, and what S-CFG keeps between its passes and steps.

    Created when the call starts and dropped when it ends (returns or raises), so nothing carries over to a
    later call, to another pipeline sharing the denoiser, or to a direct denoiser call outside a pipeline call.
    """

    prompts: list[str] | None = None
    images_per_prompt: int = 1
    arguments: dict[str, Any] = field(default_factory=dict)
    prompt: _PromptInfo | None = None
    token_scales: torch.Tensor | None = None
    regions: _Regions | None = None
    last_step: int = -1  # the last step index reported, for schedulers that repeat timesteps (PNDM, Heun)
    held: _Held | None = None
    step: tuple[int, int] | None = None  # (index, count) told by a caller that runs the loop itself (the guider)
    pair_maps: dict[Role, PassMaps] | None = None  # caller-delivered mode: the maps of the step's two passes
    pair_pass: _Pass | None = None


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
    overrides = family.preset_overrides(pipe)
    # the family's mask pooling and layer count apply to every preset unless its own overrides say otherwise
    defaults = {"mask_pool": family.default_mask_pool, "max_layers": family.default_max_layers}
    presets = {name: {**defaults, **overrides.get(name, {})} for name in PRESETS}
    return config.resolve(presets)


@contextmanager
def guidance(pipe: Any, scale: float, negative_prompt: Any = None) -> Iterator[dict[str, Any]]:
    """Within the block, a call `pipe(prompt, **arguments)` runs CFG at `scale` with `negative_prompt`, for any
    supported family: `arguments` is `guidance_arguments(...)`, and a family whose scale is not a call argument
    (HunyuanVideo 1.5: its guider's) sets it for the block and puts the pipeline back as it was on the way out.
    The CLI, the web UI and `scfg eval` call pipelines this way, so `--scale` means the CFG scale everywhere.

    >>> with scfg.guidance(pipe, 7.5, "blurry") as arguments:  # doctest: +SKIP
    ...     image = pipe("a red cat", **arguments).images[0]
    """
    try:
        family = family_for(pipe)
    except SCFGError:
        family = None
    if family is None:
        yield {"guidance_scale": scale, "negative_prompt": negative_prompt}
        return
    with family.guidance(pipe, scale, negative_prompt) as arguments:
        yield arguments


def guidance_arguments(pipe: Any, scale: float, negative_prompt: Any = None) -> dict[str, Any]:
    """The arguments of a call of `pipe` that run CFG at `scale` with `negative_prompt`, for its model family
    (`guidance_scale` for SD, `true_cfg_scale` and a negative prompt for FLUX, ...). A pipeline of no supported
    family gets diffusers' usual `guidance_scale` and `negative_prompt` (plain CFG runs; `enable` refuses it)."""
    try:
        family = family_for(pipe)
    except SCFGError:
        return {"guidance_scale": scale, "negative_prompt": negative_prompt}
    return family.guidance_arguments(scale, negative_prompt)


def enable(
    pipe: Any,
    config: SCFGConfig | str | None = None,
    *,
    on_step: Callable[[StepReport], None] | None = None,
    token_scales: Mapping[str, float] | Sequence[WordScale] | None = None,
    layout: CFGLayout | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
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
        layout (`scfg.engine.CFGLayout`, *optional*): how the sampling loop runs CFG, for a loop of your own
            around the pipeline's components (separate passes, another order, `c + s(c - u)`); by default the model
            family reads it from each call of its pipeline.
        memory_budget (`int`): bytes of head-averaged attention rows held at once (default 256 MiB). A
            self-attention map `[B, Q, Q]` larger than this is formed in blocks of query rows for each product and
            never held whole; the completion's peak extra memory is then about one block plus three `[B, Q, T]`
            products (`scfg.attention.peak_extra_bytes`).

    Only calls of `pipe` made inside the `with` block are guided; the object does nothing until it is entered.

    Example:
        ```py
        with scfg.enable(pipe):
            image = pipe("a red cube on a blue sphere", guidance_scale=7.5).images[0]
        ```
    """
    return SemanticGuidance(
        pipe, config, on_step=on_step, token_scales=token_scales, layout=layout, memory_budget=memory_budget
    )


def express_guided(
    pred_uncond: torch.Tensor,
    pred_cond: torch.Tensor,
    guided: torch.Tensor,
    guidance_scale: float,
    guidance_rescale: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """`engine.rewrite` for the `u + g(c - u)` line of one `[uncond, cond]` batch: `(pred_uncond', pred_cond',
    exact)` whose line yields `guided`, the conditional prediction kept."""
    layout = CFGLayout("batched", ("uncond", "cond"), "uncond", guidance_scale)
    return rewrite(layout, pred_uncond, pred_cond, guided, "uncond", guidance_rescale)


class SemanticGuidance:
    """Context manager that applies S-CFG to a stock diffusers pipeline; see `enable`."""

    def __init__(
        self,
        pipe: Any,
        config: SCFGConfig | str | None = None,
        *,
        on_step: Callable[[StepReport], None] | None = None,
        token_scales: Mapping[str, float] | Sequence[WordScale] | None = None,
        layout: CFGLayout | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        deliver: Literal["hooks", "caller"] = "hooks",
    ) -> None:
        if on_step is not None and not callable(on_step):
            raise SCFGError(
                f"Expected `on_step` to be callable (e.g. `scfg.Recorder()`), but got {type(on_step).__name__}."
            )
        if layout is not None and not isinstance(layout, CFGLayout):
            raise SCFGError(f"Expected `layout` as a `scfg.engine.CFGLayout`, but got {type(layout).__name__}.")
        if not (isinstance(memory_budget, int) and memory_budget > 0):
            raise SCFGError(f"Expected `memory_budget` as a positive number of bytes, but got {memory_budget!r}.")
        self.token_scales = validate_token_scales(token_scales) if token_scales else None
        self.family: ModelFamily = family_for(pipe)
        self.pipe = pipe
        self.config = resolve_config(pipe, config)
        self.on_step = on_step
        self.layout = layout
        self.memory_budget = memory_budget
        self.deliver = deliver
        self.denoisers: dict[str, nn.Module] = self.family.denoisers(pipe)
        self.denoiser: nn.Module = next(iter(self.denoisers.values()))
        self.levels: tuple[int, ...] = self.config.levels or self.family.default_levels
        self.pairs_by_denoiser = {
            name: self._select_pairs(module, self.family.layer_pairs(module))
            for name, module in self.denoisers.items()
        }
        self.pairs = self.pairs_by_denoiser[next(iter(self.denoisers))]
        self._captures = {
            name: AttentionCapture(
                module,
                list(dict.fromkeys([p.cross for p in pairs] + [p.self_attn for p in pairs if p.self_attn])),
                self.family.attention,
                self.family.projections,
                memory_budget,
            )
            for (name, module), pairs in zip(self.denoisers.items(), self.pairs_by_denoiser.values(), strict=True)
        }
        self._channels = {name: self.family.guided_channels(module) for name, module in self.denoisers.items()}
        self._stack: ExitStack | None = None
        self._call: _Call | None = None  # the running call of the enabled pipeline, if any
        self._pass: _Pass | None = None  # the denoiser pass being observed, if any
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

    def _select_pairs(self, denoiser: nn.Module, pairs: list[LayerPair]) -> list[LayerPair]:
        available = sorted({p.level for p in pairs})
        missing = [level for level in self.levels if level not in available]
        if missing:
            raise SCFGError(
                f"Expected cross-attention at latent/{missing[0]} for `levels={self.levels}`, but this "
                f"{type(denoiser).__name__} has cross-attention only at levels {available}. Pass "
                f"`levels=` with some of {available}."
            )
        chosen = [p for p in pairs if p.level in self.levels]  # families list pairs in forward order
        chosen = _last_per_group(chosen, lambda pair: _stack_of(pair.cross), self.config.layers_per_stack)
        chosen = _last_per_group(chosen, lambda pair: pair.level, self.config.layers_per_level)
        k = self.config.max_layers
        if k is not None and k < len(chosen):  # the k nearest the middle, in forward order
            start = (len(chosen) - k) // 2
            chosen = chosen[start : start + k]
        return chosen

    # -- entering and leaving ---------------------------------------------------------------------------------

    def __enter__(self) -> SemanticGuidance:
        self._entered_once = True
        if self._stack is not None:
            raise SCFGError("Expected a fresh `scfg.enable(...)` context, but this one is already entered.")
        stack = ExitStack()
        try:
            stack.enter_context(self.observe())
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

    @contextmanager
    def observe(self) -> Iterator[SemanticGuidance]:
        """Install the attention and denoiser hooks for the duration of the block, and nothing else: no call state
        is opened or dropped (`__enter__` does both; a guider that runs the loop itself uses this per pass)."""
        self._entered_once = True
        for module in self.denoisers.values():
            for hook in list(module._forward_pre_hooks.values()):
                owner = getattr(getattr(hook, "func", hook), "__self__", None)
                if isinstance(owner, SemanticGuidance) and owner is not self:
                    raise SCFGError(
                        f"Expected S-CFG to be off on this {type(module).__name__}, but another `scfg.enable` "
                        "context is active on it (maybe through another pipeline sharing it). Leave that one first."
                    )
        with ExitStack() as stack:
            for name, module in self.denoisers.items():
                stack.enter_context(self._captures[name])
                begin = functools.partial(self._begin_pass, name)
                finish = functools.partial(self._finish_pass, name)
                stack.callback(module.register_forward_pre_hook(begin, with_kwargs=True).remove)
                stack.callback(module.register_forward_hook(finish, with_kwargs=True).remove)
            stack.callback(self._end_pass)
            yield self

    def _reset(self) -> None:
        self._call = None
        self._pass = None

    @property
    def recording(self) -> bool:
        """Whether a denoiser pass is being recorded now (never outside a pass of a guided call)."""
        return self._pass is not None or any(capture.current is not None for capture in self._captures.values())

    def _end_pass(self) -> None:
        for capture in self._captures.values():
            capture.finish()
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
                guard._end_pass()
                guard._call = outer

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
        for name in ("guidance_scale", "true_cfg_scale", "guidance_scale_2"):
            scale = arguments.get(name)
            if isinstance(scale, int | float) and not isinstance(scale, bool) and math.isinf(scale) and scale > 0:
                raise SCFGError(
                    f"Expected a finite `{name}`, but got {scale!r}. S-CFG caps `g * rate` at "
                    f"{self.config.max_effective_scale} anyway; pass a number such as 7.5."
                )
        return _Call(
            prompts=prompts,
            # video pipelines call them videos
            images_per_prompt=int(
                arguments.get("num_images_per_prompt") or arguments.get("num_videos_per_prompt") or 1
            ),
            arguments=arguments,
        )

    def new_call(self) -> None:
        """Start the state of a new sampling run without a pipeline call to observe (the modular guider)."""
        self._entered_once = True
        self._call = _Call()
        self._pass = None

    def set_step(self, step: int, num_steps: int) -> None:
        """Tell the running sampling run its step, when a caller runs the loop itself (the modular guider)."""
        if self._call is not None:
            self._call.step = (int(step), int(num_steps))

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
        words = self.family.word_mask(segments)
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

    def _layout(self, call: _Call, denoiser: str) -> CFGLayout | None:
        if self.layout is not None:
            return self.layout if self.layout.is_guided else None
        return self.family.cfg_layout(self.pipe, call.arguments, denoiser)

    def _begin_pass(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._end_pass()
        call = self._call
        if call is None:  # not inside a call of the enabled pipeline: leave the denoiser alone
            return
        layout = self._layout(call, name)
        if layout is None:
            call.held = None
            return
        context = self.family.pass_context(module, args, kwargs)
        samples = context.batch if layout.passes == "separate" else context.batch // 2
        expected = len(call.prompts) * call.images_per_prompt if call.prompts is not None else None
        if (layout.passes != "separate" and context.batch % 2) or (expected is not None and samples != expected):
            # A pass that is not one of the CFG passes (e.g. SD3's skip-layer guidance on cond only): leave it alone.
            return
        timestep = float(torch.as_tensor(context.timestep).flatten()[0]) if context.timestep is not None else 0.0
        held = call.held
        if layout.passes == "separate" and held is not None and held.denoiser == name and held.timestep == timestep:
            # the second of the step's two passes
            role: Literal["batch", "cond", "uncond"] = layout.order[1]
            step, guided, reuse = held.step, held.guided, held.reuse
            if not guided:
                call.held = None
                return
        else:
            call.held = None
            role = layout.order[0] if layout.passes == "separate" else "batch"
            step, num_steps = self._step_index(call, context.timestep)
            guided = True
            if step is not None and num_steps:
                guided = self.config.start_fraction <= step / num_steps < self.config.stop_fraction
            reuse = guided and self.can_reuse(step, context.grid, samples)
            if layout.passes == "separate":
                call.held = _Held(name, step, timestep, role, guided, reuse)  # type: ignore[arg-type]
            if not guided:
                return
        current = _Pass(name, role, layout, context, step, timestep, reuse)
        # a separate pass whose maps the config never reads (token and foreground both from the cond pass) captures
        # nothing: only its prediction is needed
        needed = role == "batch" or role in (self.config.token_source, self.config.foreground_source)
        if not reuse and needed:
            current.accumulator = MapAccumulator(
                level_grid(context.grid, min(self.levels) * self.config.mask_pool),
                self.config.completion,
                self.config.completion_order,
                self.config.token_map_smoothing,
                self.family.token_roles,
            )
            self._captures[name].begin(context.grid, functools.partial(self._take_layer, current), context)
        self._pass = current

    def _take_layer(self, current: _Pass, layer: str, rows: AttentionRows) -> None:
        """Fold each pair whose layers have all run into the pass's maps, then let its attention go."""
        current.waiting[layer] = rows
        pairs = self.pairs_by_denoiser[current.denoiser]
        for pair in pairs:
            names = [pair.cross] + ([pair.self_attn] if pair.self_attn else [])
            if pair in current.done or not all(n in current.waiting for n in names):
                continue
            # the per-layer work: the probabilities (formed here, from the kept q/k), the completion and the maps
            with torch.profiler.record_function("scfg.maps"):
                queries = current.waiting[pair.cross].shape[1]
                grid = grid_for(queries, current.context.grid)
                expected = level_grid(current.context.grid, pair.level)
                if grid != expected:
                    shape = "x".join(str(n) for n in current.context.grid)
                    raise SCFGError(
                        f"Expected layer `{pair.cross}` at latent/{pair.level} of the {shape} latent, but its "
                        f"{queries} queries form a {'x'.join(str(n) for n in grid)} grid."
                    )
                rows = {n: current.waiting[n] for n in names}
                cross, self_attention, grid = self.family.mask_attention(
                    pair, rows, current.context, grid, self.config.mask_pool
                )
                current.accumulator.add(cross, self_attention, grid)  # type: ignore[union-attr]
            current.done.add(pair)
            del cross, self_attention
            needed = {n for p in pairs if p not in current.done for n in (p.cross, p.self_attn) if n}
            for n in [n for n in current.waiting if n not in needed]:
                del current.waiting[n]

    def can_reuse(self, step: int | None, grid: Sequence[int], samples: int) -> bool:
        """Whether this step may reuse the call's last computed regions (`mask_interval > 1`, same shapes)."""
        kept = self._call.regions if self._call is not None else None
        return (
            self.config.mask_interval > 1
            and kept is not None
            and step is not None
            and 0 < step - kept.step < self.config.mask_interval
            and kept.grid == tuple(grid)
            and kept.samples == samples
        )

    def _step_index(self, call: _Call, timestep: Any) -> tuple[int | None, int]:
        """The index of this pass's step in the scheduler's timesteps, and their number.

        Schedulers that repeat a timestep (PNDM's warm-up, Heun's second stage) list it several times: the step is
        the first matching index after the last one reported in this call, so indices are the loop's own. A
        timestep the pipeline rounded on its way in (FLUX passes `t / 1000` in the latents' dtype, bfloat16 keeps 8
        bits) matches the nearest listed one within 1% of it.
        """
        if call.step is not None:
            return call.step
        timesteps = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
        if timestep is None or timesteps is None or len(timesteps) == 0:
            return None, 0
        t = torch.as_tensor(timestep).flatten()[0].to(timesteps.device, timesteps.dtype)
        matches = (timesteps == t).nonzero().flatten().tolist()
        if not matches and timesteps.is_floating_point():
            distance = (timesteps - t).abs()
            nearest = int(distance.argmin())
            if bool(distance[nearest] <= 0.01 * t.abs().clamp_min(1e-3)):
                matches = [nearest]
        if not matches:
            return None, len(timesteps)
        later = [i for i in matches if i > call.last_step]
        step = later[0] if later else matches[0]
        call.last_step = step
        return step, len(timesteps)

    def _finish_pass(self, name: str, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        current, call = self._pass, self._call
        self._end_pass()
        if current is None or call is None or current.denoiser != name:
            return output
        maps = None
        if current.accumulator is not None:
            if len(current.done) != len(self.pairs_by_denoiser[name]):
                missing = sorted({p.cross for p in self.pairs_by_denoiser[name]} - {p.cross for p in current.done})
                raise SCFGError(
                    f"Expected attention maps from layers {missing} in this denoiser pass, but they did not run. The "
                    "denoiser's forward skipped them; pass `levels=` that this model uses."
                )
            maps = current.accumulator.result()
        pred = self.family.predictions(output, current.context)
        layout = current.layout
        if current.role == "batch":
            halves = layout.halves(pred)
            by_role = maps.split(layout) if maps is not None else None
            new = self._guide(call, current, by_role, halves["uncond"], halves["cond"], "uncond", None)
            if new is None:
                return output
            return self.family.with_predictions(
                output, layout.join({"uncond": new[0], "cond": new[1]}), current.context
            )
        held = call.held
        if current.role == layout.order[0]:  # the first of two passes: keep what it gave until its partner comes
            if held is not None:
                held.maps, held.prediction = maps, pred
            return output
        call.held = None
        if held is None or held.prediction is None:
            return output
        by_role = {r: m for r, m in ((held.role, held.maps), (current.role, maps)) if m is not None}
        if current.reuse:
            by_role = None  # the step reuses the call's last regions
        elif not {self.config.token_source, self.config.foreground_source} <= by_role.keys():
            return output  # a pass the regions need captured nothing (it raised, or the config changed): no guidance
        first, last = held.prediction, pred
        u, c = (first, last) if held.role == "uncond" else (last, first)
        if self.deliver == "caller":  # the caller (a guider) combines the predictions itself: keep the maps
            call.pair_maps, call.pair_pass = by_role, current
            return output
        new = self._guide(call, current, by_role, u, c, current.role, first)  # type: ignore[arg-type]
        if new is None:
            return output
        return self.family.with_predictions(output, new[0] if current.role == "uncond" else new[1], current.context)

    def guide_pair(self, pred_uncond: torch.Tensor, pred_cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For a caller that combines the two predictions itself (`deliver="caller"`, the modular guider):
        `(pred_uncond', pred_cond)` whose line yields S-CFG's prediction, from the maps its last two passes
        recorded; the predictions unchanged when there are none."""
        call = self._call
        if call is None or call.pair_pass is None:
            return pred_uncond, pred_cond
        current, by_role = call.pair_pass, call.pair_maps
        call.pair_pass = call.pair_maps = None
        new = self._guide(call, current, by_role, pred_uncond, pred_cond, "uncond", None)
        return (pred_uncond, pred_cond) if new is None else new

    def _guide(
        self,
        call: _Call,
        current: _Pass,
        maps: dict[Role, PassMaps] | None,
        pred_uncond: torch.Tensor,
        pred_cond: torch.Tensor,
        replace: Role,
        first: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`(pred_uncond', pred_cond')` whose line yields S-CFG's guided prediction for this step, or None (plain
        CFG). `maps` is None when the step reuses the call's last regions; `first` is the first of two separate
        passes' prediction (a view of the pipeline's tensor), written in place when the line cannot be met
        otherwise."""
        config, layout = self.config, current.layout
        if maps is None:  # `mask_interval > 1`: this step reuses the last regions and captured nothing
            regions = call.regions.regions  # type: ignore[union-attr]
        else:
            regions = self._regions_from(call, maps)
            if regions is None:
                return None
            if current.step is not None and config.mask_interval > 1:
                samples = regions.token_masks.shape[0]
                call.regions = _Regions(current.step, tuple(current.context.grid), samples, regions)
        # Learned-variance channels (DeepFloyd IF, PixArt) are split off before guidance and pass through unchanged.
        c = self._channels[current.denoiser] or pred_cond.shape[1]
        eps_uncond, eps_cond = pred_uncond[:, :c], pred_cond[:, :c]
        matches = self._matches_prompt(call, regions.token_masks.shape[:2])
        with torch.profiler.record_function("scfg.rate"):
            result = guided_prediction(
                eps_uncond,
                eps_cond,
                regions,
                layout,
                benchmark=config.benchmark,
                rate_clamp=config.rate_clamp,
                max_effective_scale=config.max_effective_scale,
                smoothing=config.rate_map_smoothing,
                token_scales=call.token_scales if matches else None,
                token_scale_mode=config.token_scale_mode,
                temporal_smoothing=config.temporal_smoothing,
            )
        if not (torch.isfinite(result.rate_map).all() and torch.isfinite(result.guided).all()):
            self._warn_once(
                "nonfinite_rate",
                "The S-CFG guided prediction was not finite (the model's predictions or the per-word scales "
                "overflow); this step uses plain CFG.",
            )
            return None
        rescale = float(getattr(self.pipe, "guidance_rescale", 0.0) or 0.0)
        new_uncond, new_cond, exact = rewrite(layout, eps_uncond, eps_cond, result.guided, replace, rescale)
        if not exact and first is not None:
            # Both predictions must carry the target, and the first pass's is already in the pipeline's hands: write
            # it in place (a view of the tensor the pipeline holds).
            try:
                first[:, :c].copy_(new_cond if replace == "uncond" else new_uncond)
            except RuntimeError:
                new_uncond, new_cond, _ = rewrite(layout, eps_uncond, eps_cond, result.guided, replace, 0.0)
                self._warn_once(
                    "inexact_separate",
                    "The first CFG pass's prediction could not be updated in place; this step's line is off by "
                    "more than 64 ulps.",
                )
        if not exact:
            self._warn_once(
                "inexact",
                f"The CFG scale {layout.scale:g} is too far from the scales S-CFG can pass through the pipeline's "
                "CFG line in this dtype; both CFG predictions carry the guided prediction (steps after the line, "
                "such as SD3's skip-layer guidance, then see it instead of the conditional prediction).",
            )
        if c < pred_cond.shape[1]:
            new_uncond = torch.cat([new_uncond, pred_uncond[:, c:]], dim=1)
            new_cond = torch.cat([new_cond, pred_cond[:, c:]], dim=1)
        if self.on_step is not None:
            self.on_step(
                StepReport(
                    step=current.step,
                    timestep=current.timestep,
                    guidance_scale=layout.effective_scale,
                    token_masks=regions.token_masks.bool().cpu(),
                    foreground_mask=regions.foreground.bool().cpu(),
                    rate_map=result.rate_map.cpu(),
                    token_rates=result.token_rates.cpu(),
                    region_norms=result.region_norms.cpu(),
                    benchmark_norm=result.benchmark_norm.cpu(),
                    tokens=call.prompt.tokens if matches else None,  # type: ignore[union-attr]
                )
            )
        return new_uncond, new_cond

    def _regions_from(self, call: _Call, maps: dict[Role, PassMaps]) -> Regions | None:
        """The step's regions from the two halves' maps; None (with a warning) when the maps are not finite."""
        config = self.config
        token_src = maps[config.token_source].token
        self._prepare_prompt(call, token_src.shape[1])
        allowed = self._allowed_tokens(call, token_src.shape[0], token_src.shape[1])
        with torch.profiler.record_function("scfg.segmentation"):
            regions = step_regions(maps, config.token_source, config.foreground_source, allowed, config.tie_break)
        if regions is None:
            self._warn_once(
                "nonfinite",
                "Attention maps were not finite (overflow in half precision?); this step uses plain CFG.",
            )
        return regions

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
