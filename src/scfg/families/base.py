"""The defaults every family starts from: the answers for Stable Diffusion 1.x/2.x (see `families/__init__.py`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..attention import AttentionRows, pool_cells, pooled_grid
from ..capture import LayerCall, default_attention
from ..engine import CFGLayout

__all__ = [
    "Family",
    "LayerPair",
    "PassContext",
    "chat_message_words",
    "image_first_split",
    "last_valid_token",
    "middle_half",
    "scale_argument",
    "text_first_split",
]


@dataclass(frozen=True)
class LayerPair:
    """A cross-attention layer, the self-attention layer of the same block, and their grid level.

    For joint attention (one softmax over image and text keys: IF, SD3, FLUX) `cross` and `self_attn` name the same
    layer; the family's `layer_attention` reads both parts from it.
    """

    cross: str
    self_attn: str | None
    level: int


@dataclass
class PassContext:
    """What a family reads from one denoiser call.

    Attributes:
        grid: the prediction's grid, `(H, W)` (a 4-D latent, or the token grid of a packed one) or `(F, H, W)`.
        batch: samples in this call.
        timestep: the call's timestep (the first sample's), or None.
        extra: family-specific facts the attention functions need (e.g. FLUX's text length).
    """

    grid: tuple[int, ...]
    batch: int
    timestep: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def middle_half(count: int) -> range:
    """The middle half of `count` blocks (the DiT families' default: early blocks are still close to the noise, late
    ones to pixels); every block when there are fewer than 4."""
    return range(count // 4, count - count // 4) or range(count)


def last_valid_token(cross_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_roles` for masked text: masked padding gets exactly zero probability (a -inf or -10000 bias underflows
    exp), so `[B, T]` valid tokens are those with any attention, and the reference is the last valid one (T5's EOS,
    a chat template's closing token)."""
    valid = cross_probs.amax(dim=1) > 0
    last = valid.shape[1] - 1 - valid.flip(dims=[1]).to(torch.uint8).argmax(dim=1)
    return last, valid


def chat_message_words(tokenizer: Any, ids: torch.Tensor) -> torch.Tensor | None:
    """`[P, T]` bool: the positions of the user message's content in ChatML-templated ids (Qwen's template:
    `<|im_start|>user\n` content `<|im_end|>\n<|im_start|>assistant\n` ...), or None for a tokenizer without
    ChatML's tags. The content runs from after the role name and its newline (the two tokens after the last
    `<|im_start|>` before the first `<|im_end|>`; from position 0 where a pipeline dropped that prefix) up to the
    first `<|im_end|>` (the end of the ids where truncation cut it off)."""
    tags = ("<|im_start|>", "<|im_end|>")
    start, end = (tokenizer.convert_tokens_to_ids(tag) for tag in tags)
    # both tags must be tokens of their own: a tokenizer without them maps them to its unknown (or another) id
    if (
        not all(isinstance(i, int) for i in (start, end))
        or tuple(tokenizer.convert_ids_to_tokens([start, end])) != tags
    ):
        return None
    length = ids.shape[1]
    position = torch.arange(length, device=ids.device).expand_as(ids)
    closing = torch.where(ids == end, position, length).amin(dim=1, keepdim=True)
    opening = torch.where((ids == start) & (position < closing), position, -3).amax(dim=1, keepdim=True)
    return (position >= opening + 3) & (position < closing)


def text_first_split(joint: AttentionRows, text: int | None = None) -> tuple[torch.Tensor, AttentionRows]:
    """`(cross, self)` of joint attention over `[text; image]` keys (FLUX, Qwen-Image, Krea 2): the text block
    (renormalised, dense) and the image block (renormalised), docs/algorithm.md section 4's split. `text` defaults
    to the keys beyond the image queries (`query_tokens`: the full grid's, also for pooled queries)."""
    images = joint.query_tokens
    text = joint.shape[2] - images if text is None else text
    return joint.select(slice(0, text)).dense(), joint.select(slice(text, text + images))


def image_first_split(joint: AttentionRows) -> tuple[torch.Tensor, AttentionRows]:
    """`(cross, self)` of joint attention over `[image; text]` keys (SD3, HunyuanVideo 1.5), as `text_first_split`."""
    images = joint.query_tokens
    return joint.select(slice(images, None)).dense(), joint.select(slice(0, images))


def scale_argument(arguments: Mapping[str, Any], name: str) -> float | None:
    """The call's argument `name` as a float when it is a real number (not a bool), else None."""
    value = arguments.get(name)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


class Family:
    """Defaults: a UNet `pipe.unet` with separate self (`attn1`) and cross (`attn2`) `Attention` layers, a 4-D
    prediction, CLIP tokens, and CFG as one `[uncond, cond]` batch combined as `u + g(c - u)` with
    `g = pipe.guidance_scale` (`pipe.do_classifier_free_guidance`)."""

    name = "base"
    default_levels: tuple[int, ...] = (4, 8)
    # `SCFGConfig.mask_pool` in every preset: 1 where the finest captured grid is SD's (latent/4 of an 8x VAE,
    # 32 pixels apart); 2 where a transformer's tokens are 16 pixels apart, so that its masks are 32 apart as well
    default_mask_pool: int = 1
    # `SCFGConfig.max_layers` in every preset: None keeps every layer the family lists (the UNets' recipe); the
    # transformers take 3 of their middle half, the mid-depth ones (docs/algorithm.md section 9)
    default_max_layers: int | None = None
    projections: tuple[str, ...] = ("to_q", "to_k")  # projection modules whose outputs `attention` reuses

    def matches(self, pipe: Any) -> bool:
        raise NotImplementedError

    def denoisers(self, pipe: Any) -> dict[str, nn.Module]:
        """The denoiser modules to guide, by the pipeline attribute that holds them."""
        return {"unet": pipe.unet}

    def denoiser(self, pipe: Any) -> nn.Module:
        """The first denoiser (the one whose layers the CLI and the benchmarks describe)."""
        return next(iter(self.denoisers(pipe).values()))

    def preset_overrides(self, pipe: Any) -> dict[str, dict[str, Any]]:
        return {}

    def layer_pairs(self, denoiser: nn.Module) -> list[LayerPair]:
        raise NotImplementedError

    # -- attention ------------------------------------------------------------------------------------------------

    def attention(self, module: nn.Module, call: LayerCall, context: PassContext | None, budget: int | None):
        """`AttentionRows` of one captured layer, from its call (inputs and the processor's projections)."""
        return default_attention(module, call, context, budget)

    def layer_attention(
        self, pair: LayerPair, rows: Mapping[str, AttentionRows], context: PassContext | None
    ) -> tuple[torch.Tensor, torch.Tensor | AttentionRows | None]:
        """`(cross [B, Q, T], self [B, Q, Q] or None)` of a pair whose layers have run, image queries only."""
        self_rows = rows[pair.self_attn] if pair.self_attn is not None else None
        return rows[pair.cross].dense(), self_rows

    def mask_attention(
        self,
        pair: LayerPair,
        rows: Mapping[str, AttentionRows],
        context: PassContext | None,
        grid: tuple[int, ...],
        pool: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor | AttentionRows | None, tuple[int, ...]]:
        """`(cross, self, grid)` of a pair on the mask grid: `layer_attention` on the layer's own `grid`, or with
        `pool > 1` (`SCFGConfig.mask_pool`) on the grid `pool` times coarser: every layer's queries pooled per cell
        before `layer_attention` reads its blocks, and the self block's key columns summed per cell
        (docs/algorithm.md section 9)."""
        if pool == 1:
            return (*self.layer_attention(pair, rows, context), grid)
        pooled = {name: r.pool_queries(grid, pool) for name, r in rows.items()}
        cross, self_attention = self.layer_attention(pair, pooled, context)
        if isinstance(self_attention, AttentionRows):
            self_attention = self_attention.pool_columns(grid, pool)
        elif self_attention is not None:
            self_attention = pool_cells(self_attention, grid, pool, dim=-1, reduce="sum")
        return cross, self_attention, pooled_grid(grid, pool)

    def word_mask(self, segments: list[tuple[Any, torch.Tensor]]) -> torch.Tensor:
        """`[P, T]` bool: which of `tokenize`'s positions are the prompt's words (`region_tokens="words"`, per-word
        scales' legends). Default: every token that is not one of its tokenizer's special tokens and, in
        ChatML-templated text (Qwen-Image, FLUX.2 [klein], Z-Image, Krea 2), lies inside the user message
        (`chat_message_words`): the role name, the newlines and the assistant turn are the template's."""
        masks = []
        for tok, part in segments:
            words = ~torch.isin(part, torch.tensor(sorted(set(tok.all_special_ids))))
            message = chat_message_words(tok, part)
            masks.append(words if message is None else words & message)
        return torch.cat(masks, dim=1)

    def token_roles(self, cross_probs: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`[B]` index of the foreground's reference token (None: token 0) and `[B, T]` real (unmasked) tokens
        (None: all), from one layer's `[B, Q, T]` cross-attention."""
        return None, None  # CLIP: token 0 (start) is the reference; no masked tokens

    # -- the pipeline's CFG ---------------------------------------------------------------------------------------

    def cfg_layout(self, pipe: Any, arguments: Mapping[str, Any], denoiser: str) -> CFGLayout | None:
        """How this call of `pipe` runs CFG for a pass of `denoiser`, or None when it runs none (plain sampling).

        Read on every pass: pipelines set `guidance_scale` during the call, and some (Wan 2.2) change it between
        denoisers.
        """
        if getattr(pipe, "do_perturbed_attention_guidance", False):
            # PAG's batch is [uncond, cond, perturbed]: not a CFG batch of two halves; left alone
            return None
        try:
            if not pipe.do_classifier_free_guidance:
                return None
            scale = float(pipe.guidance_scale)
        except AttributeError:  # pipelines that keep them local (DeepFloyd IF): CFG iff guidance_scale > 1
            scale = scale_argument(arguments, "guidance_scale")
            if scale is None:
                return None
        layout = CFGLayout("batched", ("uncond", "cond"), "uncond", scale)
        return layout if layout.is_guided else None

    def guidance_arguments(self, scale: float, negative_prompt: Any = None) -> dict[str, Any]:
        """The pipeline-call arguments that run CFG at `scale` with `negative_prompt` (the CLI, the web UI and
        `scfg eval` call pipelines through `guidance`, so one `--scale` means the CFG scale on every family)."""
        return {"guidance_scale": scale, "negative_prompt": negative_prompt}

    @contextlib.contextmanager
    def guidance(self, pipe: Any, scale: float, negative_prompt: Any = None) -> Iterator[dict[str, Any]]:
        """Within the block, calls of `pipe` with the yielded arguments run CFG at `scale`: `guidance_arguments`,
        and nothing to set up. A family whose scale is not a call argument (HunyuanVideo 1.5's guider) sets it
        here and puts the pipeline back as it was on the way out."""
        yield self.guidance_arguments(scale, negative_prompt)

    # -- one denoiser call ----------------------------------------------------------------------------------------

    def pass_context(self, denoiser: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> PassContext:
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        return PassContext(grid=tuple(int(n) for n in sample.shape[2:]), batch=int(sample.shape[0]), timestep=timestep)

    def predictions(self, output: Any, context: PassContext) -> torch.Tensor:
        """The call's prediction as `[B, C, *grid]`."""
        return output[0] if isinstance(output, tuple) else output.sample

    def with_predictions(self, output: Any, pred: torch.Tensor, context: PassContext) -> Any:
        """`output` with its prediction replaced by `pred` (`[B, C, *grid]`)."""
        if isinstance(output, tuple):
            return (pred, *output[1:])
        output.sample = pred
        return output

    def guided_channels(self, denoiser: nn.Module) -> int | None:
        """How many leading channels are the prediction (the rest, learned variance, pass through); None: all."""
        return None

    # -- text -----------------------------------------------------------------------------------------------------

    def tokenize(self, pipe: Any, prompts: list[str], num_tokens: int) -> list[tuple[Any, torch.Tensor]]:
        """`(tokenizer, ids [P, T_k])` for each consecutive part of the `num_tokens` text tokens the denoiser sees."""
        tokenizer = getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)
        if tokenizer is None:
            return []
        ids = tokenizer(prompts, padding="max_length", max_length=num_tokens, truncation=True, return_tensors="pt")
        return [(tokenizer, ids.input_ids)]
