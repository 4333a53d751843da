"""Kolors: SDXL's `UNet2DConditionModel` conditioned on ChatGLM3-6B hidden states that the UNet projects itself.

What the cross-attention sees: the pipeline tokenises the prompt with `ChatGLMTokenizer` to `max_sequence_length`
(256) tokens, padded on the LEFT, `[pad, ..., pad, [gMASK], sop, word tokens]`, and passes ChatGLM's penultimate
hidden states (4096 wide) to the UNet, which projects them to its cross-attention width (`encoder_hid_proj`,
`encoder_hid_dim_type="text_proj"`). A loaded IP-Adapter keeps that projection as `text_encoder_hid_proj` and sets
`encoder_hid_dim_type="ip_image_proj"`; `attn2` then gets `(text, image embeddings)` and the cross map is the text
part, as for SD. The UNet's cross-attention has no mask: every one of the 256 positions is a key.

Region definition:
- Layers, levels and presets are SDXL's (`sdxl_unet`): the Kolors UNet has SDXL's shape (attention at latent/2 and
  latent/4, 10-deep stacks at latent/4); the default is latent/4, the last block of each stack.
- The padding takes part in the competition for regions, as CLIP's padding does in SD (docs/algorithm.md step 4):
  it is not masked. ChatGLM masks padding keys in its own attention, but padding queries attend to the whole
  sequence, and every pad has the same id and position 0, so the pads' hidden states, hence their cross-attention
  columns, are identical. Under the official multi-hot tie rule a pixel won by the padding would belong to every
  pad's region and add their rates (up to 254 times); so the padding owns regions as one token, the first pad
  (`token_roles`' valid tokens exclude the others).
- The foreground's reference (CLIP's start token in docs/algorithm.md step 2e) is `[gMASK]`, the first token after
  the padding. ChatGLM3 is causal and `[gMASK]` attends only to itself at position 0, so its hidden state is the
  same for every prompt, as CLIP's start token's is; in causal language models the first token is the attention
  sink (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024; Sun et al., "Massive
  Activations in Large Language Models", COLM 2024). Its position is the number of pads, read per sample from the
  cross-attention: the leading run of columns equal to column 0. A prompt that fills the length (long prompts are
  truncated to 254 tokens after the prefix) has no padding and `[gMASK]` is token 0; a prompt exactly one token
  short has a single pad and is read the same way (that pad then plays the reference).
- All-zero negative embeddings (`force_zeros_for_empty_prompt=True`): every column is the same, token 0 is the
  reference and the only token that may own a region; the foreground of uniform attention is the whole image, as
  for SDXL's zeroed negative prompt.
- The CFG batch is `[uncond, cond]`, `u + g(c - u)` with `g = guidance_scale` (CFG iff `g > 1`), as SDXL. The
  foreground comes from the uncond half as in SD: the default negative prompt `""` is `[pads, [gMASK], sop]`, the
  shape of SD's `""` (start token, end token, padding).
- Token strings and per-word scales come from the pipeline's own tokenizer call; the pad, `[gMASK]`, `sop` and
  ChatGLM's other special tokens are not words (`region_tokens="words"`).

Not validated on real weights: `[gMASK]` as the reference (`sop`, also the same for every prompt, is the other
candidate), the padding's region behaving like CLIP's padding in SD, and latent/4 as Kolors' semantic level. Look
at `--show-regions` on the released checkpoint (Kwai-Kolors/Kolors-diffusers).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DConditionModel

from .sd_unet import has_added_kv_attention
from .sdxl_unet import SDXLUNetFamily

__all__ = ["FAMILY", "padding_roles"]

# Columns within this fraction of column 0's largest probability count as the same as column 0. Identical key rows
# give bit-identical columns (the same dot products over one softmax normaliser); the tolerance only absorbs a
# kernel that rounds identical rows differently (~1e-7 relative in float32), while two different tokens' columns
# differ by far more somewhere among the layer's queries.
_SAME_COLUMN = 1e-3


def _is_chatglm(text_encoder: Any, tokenizer: Any) -> bool:
    """Whether the text side is ChatGLM's (each part ChatGLM or None, at least one present); by class name, so
    diffusers releases without Kolors import this module too."""
    names = {type(text_encoder).__name__, type(tokenizer).__name__} - {"NoneType"}
    return bool(names) and names <= {"ChatGLMModel", "ChatGLMTokenizer"}


def projects_text(unet: UNet2DConditionModel) -> bool:
    """Whether the UNet projects the text states itself (Kolors' `text_proj`, kept as `text_encoder_hid_proj` while
    an IP-Adapter is loaded)."""
    return unet.config.encoder_hid_dim_type == "text_proj" or getattr(unet, "text_encoder_hid_proj", None) is not None


def padding_roles(cross_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B]` position of `[gMASK]` and `[B, T]` tokens that may own regions, from cross-attention `[B, Q, T]` over a
    left-padded ChatGLM sequence `[pad * P, [gMASK], sop, words]`.

    The pads' columns are identical, so `P` is the length of the leading run of columns equal to column 0 (within
    `_SAME_COLUMN` of its largest value). A run of one is no padding (`[gMASK]` is token 0); a run of every column
    is uniform attention (all-zero embeddings): token 0 is then the reference. Only the first of the pads may own a
    region.

    >>> pads = torch.full((1, 6, 3), 0.1)
    >>> probs = torch.cat([pads, torch.rand(1, 6, 4)], dim=2)
    >>> reference, valid = padding_roles(probs)
    >>> reference.tolist(), valid.int().tolist()
    ([3], [[1, 0, 0, 1, 1, 1, 1]])
    """
    t = cross_probs.shape[2]
    first = cross_probs[:, :, :1]
    scale = first.abs().amax(dim=1)  # [B, 1]
    same = (cross_probs - first).abs().amax(dim=1) <= _SAME_COLUMN * scale  # [B, T]
    run = same.to(torch.int32).cumprod(dim=1).sum(dim=1)  # leading columns equal to column 0 (at least 1)
    reference = torch.where((run > 1) & (run < t), run, torch.zeros_like(run)).long()
    positions = torch.arange(t, device=cross_probs.device)
    valid = ~((positions[None] > 0) & (positions[None] < run[:, None]))  # repeats of the first pad never own
    return reference, valid


class _ChatGLMTokens:
    """The pipeline's `ChatGLMTokenizer` as the word masks read it: the pad, `<s>`, `</s>` and ChatGLM's prompt
    tokens (`[gMASK]`, `sop`, ...) are special ids (`all_special_ids` lists none of them in transformers 5), and pads
    read `<pad>` (the tokenizer shows them as empty strings)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        glm = tokenizer.tokenizer  # the sentencepiece model with ChatGLM's extra ids
        self.pad_token_id = tokenizer.pad_token_id
        self.all_special_ids = sorted({glm.pad_id, glm.bos_id, glm.eos_id, *glm.special_tokens.values()})

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "tokenizer":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        tokens = self.tokenizer.convert_ids_to_tokens(ids)
        return ["<pad>" if i == self.pad_token_id else token for i, token in zip(ids, tokens, strict=True)]


class KolorsFamily(SDXLUNetFamily):
    """Adapter for Kolors pipelines (text-to-image, img2img; PAG's pipeline only while PAG is off)."""

    name = "kolors"

    def matches(self, pipe: Any) -> bool:
        unet = getattr(pipe, "unet", None)
        if not (
            isinstance(unet, UNet2DConditionModel)
            and unet.config.addition_embed_type == "text_time"
            and not hasattr(pipe, "text_encoder_2")
            and not has_added_kv_attention(unet)
        ):
            return False
        text_encoder, tokenizer = getattr(pipe, "text_encoder", None), getattr(pipe, "tokenizer", None)
        if text_encoder is None and tokenizer is None:
            # run on prompt embeddings: a Kolors pipeline, or (a bare holder) the UNet's own ChatGLM projection
            return type(pipe).__name__.startswith("Kolors") or projects_text(unet)
        return _is_chatglm(text_encoder, tokenizer)

    def token_roles(self, cross_probs: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return padding_roles(cross_probs)

    def tokenize(self, pipe: Any, prompts: list[str], num_tokens: int) -> list[tuple[Any, torch.Tensor]]:
        tokenizer = getattr(pipe, "tokenizer", None)
        if tokenizer is None:
            return []
        # the pipeline's own call (left padding, `[gMASK] sop` first), to the length the UNet sees
        ids = tokenizer(prompts, padding="max_length", max_length=num_tokens, truncation=True, return_tensors="pt")
        return [(_ChatGLMTokens(tokenizer), ids.input_ids)]


FAMILY = KolorsFamily()
