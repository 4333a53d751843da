"""HunyuanVideo 1.5 text-to-video: `HunyuanVideo15Pipeline` on `HunyuanVideo15Transformer3DModel` (54 dual-stream
blocks in the released 480p and 720p models).

How the pipeline runs CFG (read from its `__call__`): through its `guider`, a diffusers `ClassifierFreeGuidance`.
Each step the guider's `prepare_inputs` gives the prompt's batch first (`pred_cond`), then the negative prompt's
(`pred_uncond`); the transformer runs once on each, and the guider's `forward` combines them as `pred_uncond +
guidance_scale · (pred_cond - pred_uncond)`: `CFGLayout("separate", ("cond", "uncond"), "uncond",
guider.guidance_scale)`. The guider decides per step whether CFG runs (`enabled`, `start`/`stop`, a scale of 1):
its public `num_conditions` is 2 exactly then, and only those steps are guided. `guidance_rescale` stays the
guider's, applied to the rewritten prediction against the model's own conditional one. Other guiders (adaptive
projected, CFG-Zero*, skip-layer, perturbed-attention, ...) and `use_original_formulation=True` are refused: their
lines are not the affine `u + s(c - u)` that S-CFG rewrites through.

Region definition (docs/algorithm.md sections 2 and 8):
- Grid. The latent is `[B, C, F, H, W]` (32 channels, 16x spatial and 4x temporal compression) and the released
  patch is `(1, 1, 1)`: every latent cell is a token, so maps, masks and the rule share the grid `(F, H, W)`
  (level 1). Other patch sizes are refused.
- Layers. Each dual-stream block runs one softmax over `[image; text]` keys, image tokens first: `to_q`/`to_k`, heads
  split, `norm_q`/`norm_k` (RMS), 3-D RoPE on the image tokens only (frames, height, width), then the text's
  `add_k_proj` and `norm_added_k` appended without rotation; `hunyuan_video15_qk` mirrors
  `HunyuanVideo15AttnProcessor2_0` op for op. For the image queries the image-to-text block is the cross map and
  the image-to-image block (spatio-temporal, so the completion couples frames) the self map, each renormalised, as
  for SD3 and FLUX. The middle half of the blocks is the candidate set whose mid-depth three feed the maps (`max_layers=3`) (blocks 13-40 of 54), as for SD3, FLUX and Wan.
- Text. The transformer joins, per sample, `[valid image tokens, valid byT5 tokens, valid MLLM tokens, padding]`
  (1985 positions: 729 SigLIP image tokens, zero and masked in text-to-video; 256 byT5 glyph tokens of the prompt's
  quoted text; 1000 Qwen2.5-VL tokens of the prompt in its chat template after a fixed crop of the system
  message) and masks the padding with its attention mask. Masked positions get exactly zero probability: they
  never own a region and are not in the foreground's rest-of-text sum. Every valid position competes (the byT5
  tokens of quoted text too); with `region_tokens="words"` only the prompt's own Qwen tokens do (the chat
  template's tokens and the byT5 tokens are not words; a quoted word is scaled through its Qwen tokens).
- Foreground. An LLM encoder has no start token; as for PixArt and Wan (the EOS of T5), the last valid position
  plays its role: the end of the chat template's generation prompt (`<|im_start|>assistant` and its newline),
  never a word. The foreground comes from the conditional pass in this family's presets: the negative prompt is
  empty by default (the chat template alone, no words).

Not validated on real weights (no HunyuanVideo 1.5 checkpoint was run): the choice of blocks, the last template
token as the foreground reference, the foreground from the conditional pass, and letting the byT5 glyph tokens
compete for regions; look at `--show-regions` or a `scfg.Recorder`'s masks. The image-to-video pipeline
(`HunyuanVideo15ImageToVideoPipeline`: valid SigLIP image tokens in the text sequence, a conditioning frame) is not
supported. References: HunyuanVideo 1.5 technical report (Tencent Hunyuan, 2025) for the architecture; Shen et al.,
CVPR 2024 for S-CFG.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import AttentionRows
from ..capture import LayerCall
from ..capture import recorded_projection as _projection
from ..config import SCFGError
from ..engine import CFGLayout
from .base import Family, LayerPair, PassContext, image_first_split, last_valid_token

__all__ = ["FAMILY", "SUPPORTED_GUIDERS", "SUPPORTED_PROCESSORS", "hunyuan_video15_bias", "hunyuan_video15_qk"]

logger = logging.getLogger(__name__)

SUPPORTED_PROCESSORS = ("HunyuanVideo15AttnProcessor2_0",)
SUPPORTED_GUIDERS = ("ClassifierFreeGuidance",)
_IMAGE_TO_VIDEO = "HunyuanVideo15ImageToVideoPipeline"


def _check_processor(attn: nn.Module) -> None:
    """Raise unless `attn`'s processor is the one `hunyuan_video15_qk` mirrors."""
    processor = type(getattr(attn, "processor", None)).__name__
    if processor not in SUPPORTED_PROCESSORS:
        raise SCFGError(
            f"Expected a HunyuanVideo 1.5 attention layer with processor {', '.join(SUPPORTED_PROCESSORS)}, but got "
            f"{type(attn).__name__} with processor {processor}. S-CFG forms the layer's queries and keys the way that "
            "processor does: restore it with `transformer.set_attn_processor(HunyuanVideo15AttnProcessor2_0())`."
        )


def hunyuan_video15_qk(
    attn: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    projections: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the image queries `[B, heads, Q, d]` and the joint keys `[B, heads, Q + T, d]` (image tokens first)
    exactly as `HunyuanVideo15AttnProcessor2_0` passes them to its attention, heads first.

    The processor's order, mirrored with the same functions: 1. `to_q`/`to_k` of `hidden_states`, heads split with
    `unflatten(2, (heads, -1))`; 2. `norm_q`/`norm_k`; 3. the rotary embedding on the image tokens
    (`apply_rotary_emb(..., sequence_dim=1)`); 4. `add_k_proj` of `encoder_hidden_states`, heads split,
    `norm_added_k`, appended after the image keys without rotation. Text queries are not needed and not formed.
    The softmax scale is the attention function's default, `d ** -0.5`; the mask is `hunyuan_video15_bias`.

    Args:
        attn (`nn.Module`): the `attn` of a `HunyuanVideo15TransformerBlock`.
        hidden_states (`torch.Tensor` of shape `[B, Q, C]`): the image stream, as the layer received it.
        encoder_hidden_states (`torch.Tensor` of shape `[B, T, C]`, *optional*): the text stream.
        image_rotary_emb (`tuple[torch.Tensor, torch.Tensor]`, *optional*): the `(cos, sin)` pair `[Q, d]`.
        projections (`Mapping[str, torch.Tensor]`, *optional*): outputs of `to_q`, `to_k`, `add_k_proj` recorded
            during the processor's own call, used instead of projecting again (the same tensors, so bit-identical).
    """
    _check_processor(attn)
    query = _projection(attn, "to_q", hidden_states, projections).unflatten(2, (attn.heads, -1))
    key = _projection(attn, "to_k", hidden_states, projections).unflatten(2, (attn.heads, -1))
    query = attn.norm_q(query)
    key = attn.norm_k(key)
    if image_rotary_emb is not None:
        from diffusers.models.embeddings import apply_rotary_emb

        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    if encoder_hidden_states is not None:
        text_key = _projection(attn, "add_k_proj", encoder_hidden_states, projections).unflatten(2, (attn.heads, -1))
        if attn.norm_added_k is not None:
            text_key = attn.norm_added_k(text_key)
        key = torch.cat([key, text_key], dim=1)
    return query.transpose(1, 2), key.transpose(1, 2)


def hunyuan_video15_bias(attention_mask: torch.Tensor | None, num_keys: int) -> torch.Tensor | None:
    """The additive mask `[B, 1, 1, Q + T]` of the image queries' rows: 0 where the processor lets them attend,
    `-inf` where not.

    The processor pads the text mask `[B, T]` on the left with True for the `Q` image tokens and attends where both
    the query's and the key's positions are valid; every image query is valid, so its row is the padded mask.

    >>> bias = hunyuan_video15_bias(torch.tensor([[True, True, False]]), 5)  # 2 image tokens, 2 text + 1 padding
    >>> bias.shape, bias.flatten().tolist()
    (torch.Size([1, 1, 1, 5]), [0.0, 0.0, 0.0, 0.0, -inf])
    """
    if attention_mask is None:
        return None
    mask = F.pad(attention_mask, (num_keys - attention_mask.shape[1], 0), value=True).bool()
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, -torch.inf)
    return bias[:, None, None, :]


class HunyuanVideo15Family(Family):
    """Adapter for `HunyuanVideo15Pipeline` (text-to-video)."""

    name = "hunyuan_video15"
    default_levels = (1,)
    default_mask_pool = 2  # tokens 16 pixels apart: masks 32 apart, as SD's recipe has (base.Family)
    default_max_layers = 3  # the mid-depth 3 of the middle half: ~1% of a step each (base.Family)
    projections = ("to_q", "to_k", "add_k_proj")  # the processor's own (no text queries needed)

    def matches(self, pipe: Any) -> bool:
        if any(cls.__name__ == _IMAGE_TO_VIDEO for cls in type(pipe).__mro__):
            return False  # its valid SigLIP tokens would compete for regions: not supported (module docstring)
        return type(getattr(pipe, "transformer", None)).__name__ == "HunyuanVideo15Transformer3DModel"

    def denoisers(self, pipe: Any) -> dict[str, nn.Module]:
        return {"transformer": pipe.transformer}

    def preset_overrides(self, pipe: Any) -> dict[str, dict[str, Any]]:
        return {"official": {"foreground_source": "cond"}, "paper": {"foreground_source": "cond"}}

    def layer_pairs(self, denoiser: nn.Module) -> list[LayerPair]:
        config = denoiser.config
        if int(config.patch_size) != 1 or int(config.patch_size_t) != 1:
            raise SCFGError(
                f"Expected a HunyuanVideo 1.5 transformer with patch size 1 and temporal patch size 1 (every released "
                f"model), but got {config.patch_size} and {config.patch_size_t}."
            )
        blocks = len(denoiser.transformer_blocks)
        pairs = []
        for i in range(blocks // 4, blocks - blocks // 4):  # the middle half; every block when there are < 4
            name = f"transformer_blocks.{i}.attn"
            _check_processor(denoiser.get_submodule(name))
            pairs.append(LayerPair(name, name, 1))
        return pairs

    # -- attention ------------------------------------------------------------------------------------------------

    def attention(self, module: nn.Module, call: LayerCall, context: PassContext | None, budget: int | None):
        hidden_states = call.input(0, "hidden_states")
        encoder_hidden_states = call.input(1, "encoder_hidden_states")
        attention_mask = call.input(2, "attention_mask")
        rotary = call.input(3, "image_rotary_emb")
        query, key = hunyuan_video15_qk(
            module, hidden_states, encoder_hidden_states, rotary, projections=call.projections
        )
        bias = hunyuan_video15_bias(attention_mask, key.shape[2])
        kwargs = {} if budget is None else {"budget": budget}
        return AttentionRows(query, key, query.shape[-1] ** -0.5, bias, **kwargs)

    def layer_attention(
        self, pair: LayerPair, rows: Mapping[str, AttentionRows], context: PassContext | None
    ) -> tuple[torch.Tensor, AttentionRows]:
        # image keys first; each block's rows renormalised (masked text positions stay exactly zero)
        return image_first_split(rows[pair.cross])

    def token_roles(self, cross_probs: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        # Masked positions get exactly zero probability (a -inf bias); the last valid one ends the chat template.
        return last_valid_token(cross_probs)

    # -- the pipeline's CFG ---------------------------------------------------------------------------------------

    def cfg_layout(self, pipe: Any, arguments: Mapping[str, Any], denoiser: str) -> CFGLayout | None:
        guider = getattr(pipe, "guider", None)
        if guider is None:
            return None
        kind = type(guider).__name__
        if kind not in SUPPORTED_GUIDERS:
            raise SCFGError(
                f"Expected the pipeline's guider to be one of {', '.join(SUPPORTED_GUIDERS)} (the CFG line S-CFG "
                f"rewrites through), but got {kind}. Set `pipe.guider = ClassifierFreeGuidance(guidance_scale=...)`"
                + (", or leave `scfg.enable` out: that guider already is S-CFG." if kind == "SemanticGuider" else ".")
            )
        if guider.use_original_formulation:
            raise SCFGError(
                "Expected the pipeline's `ClassifierFreeGuidance` with `use_original_formulation=False` (the line "
                "`u + s(c - u)`), but got True. Use `pipe.guider = pipe.guider.new(use_original_formulation=False)`."
            )
        if guider.num_conditions < 2:  # disabled, outside [start, stop) on this step, or a scale of 1
            return None
        layout = CFGLayout("separate", ("cond", "uncond"), "uncond", float(guider.guidance_scale))
        return layout if layout.is_guided else None

    def guidance_arguments(self, scale: float, negative_prompt: Any = None) -> dict[str, Any]:
        raise SCFGError(
            "Expected a pipeline whose CFG scale is a call argument, but HunyuanVideo15Pipeline takes it from its "
            f"guider. Use `with scfg.guidance(pipe, {scale:g}) as arguments: pipe(prompt, **arguments)`, or set "
            f"`pipe.guider = pipe.guider.new(guidance_scale={scale:g})` and pass `negative_prompt=` yourself."
        )

    @contextlib.contextmanager
    def guidance(self, pipe: Any, scale: float, negative_prompt: Any = None) -> Iterator[dict[str, Any]]:
        """The scale is the guider's: the pipeline's guider is replaced by a copy at `scale`
        (`guider.new(guidance_scale=scale)`, diffusers' way to change a guider's config) inside the block, and put
        back on the way out, also after an exception."""
        guider = getattr(pipe, "guider", None)
        if guider is None or not callable(getattr(guider, "new", None)):
            raise SCFGError(
                "Expected a HunyuanVideo15Pipeline with a diffusers guider (`pipe.guider`, whose `new()` copies it "
                f"with another scale), but got {type(guider).__name__}."
            )
        pipe.guider = guider.new(guidance_scale=float(scale))
        try:
            yield {"negative_prompt": negative_prompt}
        finally:
            pipe.guider = guider

    # -- one denoiser call ----------------------------------------------------------------------------------------

    def pass_context(self, denoiser: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> PassContext:
        hidden_states = args[0] if args else kwargs["hidden_states"]
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        if hidden_states.ndim != 5:
            raise SCFGError(
                f"Expected the HunyuanVideo 1.5 transformer's `hidden_states` as [B, C, F, H, W], but got shape "
                f"{list(hidden_states.shape)}."
            )
        image_embeds = kwargs.get("image_embeds")
        # the transformer itself branches on this (a sync it makes anyway): non-zero SigLIP tokens are image-to-video
        if image_embeds is not None and bool((image_embeds != 0).any()):
            raise SCFGError(
                "Expected text-to-video (zero `image_embeds`, as HunyuanVideo15Pipeline passes), but got image "
                "embeddings: image-to-video puts 729 valid SigLIP tokens into the text sequence, which S-CFG does not "
                "support for HunyuanVideo 1.5 yet."
            )
        grid = tuple(int(n) for n in hidden_states.shape[2:])  # (F, H, W): the patch is 1
        # the pipeline passes the scheduler's own timestep (sigma * 1000), one per sample
        return PassContext(grid=grid, batch=int(hidden_states.shape[0]), timestep=timestep)

    # -- text -----------------------------------------------------------------------------------------------------

    def tokenize(self, pipe: Any, prompts: list[str], num_tokens: int) -> list[tuple[Any, torch.Tensor]]:
        """The Qwen ids of the positions the transformer sees, `[P, num_tokens]`: per sample the byT5 glyph tokens
        (first), then the MLLM tokens, then padding, as the transformer joins them. Only the prompt's own Qwen
        tokens keep their ids; every other position (byT5 tokens, the chat template and the system message left
        after the pipeline's crop, padding) is the pad token, which is special, so never a word."""
        tokenizer = getattr(pipe, "tokenizer", None)
        names = ("system_message", "prompt_template_encode_start_idx", "tokenizer_max_length")
        if tokenizer is None or tokenizer.pad_token_id is None or not all(hasattr(pipe, n) for n in names):
            return []
        from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import format_text_input

        crop = int(pipe.prompt_template_encode_start_idx or 0)
        conversations = format_text_input(prompts, pipe.system_message)
        encoded = tokenizer.apply_chat_template(  # the pipeline's own call (`_get_mllm_prompt_embeds`)
            conversations,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            padding="max_length",
            max_length=int(pipe.tokenizer_max_length) + crop,
            truncation=True,
            return_tensors="pt",
        )
        ids = encoded.input_ids[:, crop:]
        valid = encoded.attention_mask[:, crop:].bool()
        glyphs = self._glyph_tokens(pipe, prompts)
        pad = int(tokenizer.pad_token_id)
        out = torch.full((len(prompts), num_tokens), pad, dtype=torch.long)
        for row, (conversation, prompt) in enumerate(zip(conversations, prompts, strict=True)):
            own = self._prompt_positions(tokenizer, conversation, prompt, ids[row], crop)
            start = glyphs[row]
            real = ids[row][valid[row]]  # right padding: the valid tokens come first, as the transformer keeps them
            if start + len(real) > num_tokens:
                return []  # not the text layout this family knows (prompt_embeds of other lengths?)
            own = own[own < len(real)]
            kept = torch.full_like(real, pad)
            kept[own] = real[own]
            out[row, start : start + len(real)] = kept
        return [(tokenizer, out)]

    @staticmethod
    def _glyph_tokens(pipe: Any, prompts: list[str]) -> list[int]:
        """How many byT5 tokens the pipeline gives each prompt (its quoted text; 0 without any)."""
        from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import extract_glyph_texts

        tokenizer_2 = getattr(pipe, "tokenizer_2", None)
        counts = []
        for prompt in prompts:
            glyph = extract_glyph_texts(prompt)
            if glyph is None or tokenizer_2 is None:
                counts.append(0)
                continue
            mask = tokenizer_2(
                glyph,
                padding="max_length",
                max_length=int(getattr(pipe, "tokenizer_2_max_length", 256)),
                truncation=True,
                add_special_tokens=True,
                return_tensors="pt",
            ).attention_mask
            counts.append(int(mask.sum()))
        return counts

    @staticmethod
    def _prompt_positions(
        tokenizer: Any, conversation: list[dict[str, str]], prompt: str, cropped: torch.Tensor, crop: int
    ) -> torch.Tensor:
        """Positions, in the cropped sequence, of the tokens of the user's `prompt` inside its chat template.

        The template is rendered as text and the prompt found in it after the system message; the tokens before
        it and through it are counted by tokenizing those prefixes, which reproduces the template's tokens where
        the boundaries are special tokens or newlines (Qwen's). Where it does not, the row has no word tokens.
        """
        if not prompt.strip():
            return torch.zeros(0, dtype=torch.long)
        rendered = tokenizer.apply_chat_template([conversation], add_generation_prompt=True, tokenize=False)
        rendered = rendered[0] if isinstance(rendered, list) else rendered
        start = rendered.rfind(prompt)
        if start < 0:
            return torch.zeros(0, dtype=torch.long)
        before = tokenizer(rendered[:start], add_special_tokens=False).input_ids
        through = tokenizer(rendered[: start + len(prompt)], add_special_tokens=False).input_ids
        full = [*([None] * crop), *cropped.tolist()]  # positions before the crop are unknown here
        if len(through) > len(full) or full[crop : len(through)] != through[crop:] or through[: len(before)] != before:
            logger.warning(
                "Could not locate the prompt's tokens in HunyuanVideo 1.5's chat template; this prompt has no word "
                "tokens (`region_tokens='words'` and per-word scales skip it)."
            )
            return torch.zeros(0, dtype=torch.long)
        return torch.arange(max(len(before), crop), len(through)) - crop


FAMILY = HunyuanVideo15Family()
