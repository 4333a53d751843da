"""Train a demo model from scratch on CPU: `python -m scfg.demo.train --work DIR [--recipe scenes] [--export FOLDER]`.

Two recipes (`RECIPES`):
- `shapes`, the first demo model: flat shapes on white, 64x64x3 images <-> 32x32x4 latents, cross-attention at
  latent/4 and latent/8 only (8x8 and 4x4), as in SD's layer recipe;
- `scenes`, the second: the same shapes on textured, named backgrounds (`scfg.demo.data`), 64x64x3 <-> 16x16x4
  latents, cross-attention at latent/1 and latent/2 (16x16 and 8x8: masks on a 16x16 grid), and a grounding loss
  on the cross-attention (below).

Three phases, all resumable from `DIR/ckpt.pt` (written every `--checkpoint-minutes`):

1. a small `AutoencoderKL`, reconstruction MSE plus a tiny KL term;
2. a `UNet2DConditionModel` and a 2-layer `CLIPTextModel` trained jointly on the frozen autoencoder's latents,
   epsilon objective, 10% caption dropout for CFG, an EMA of both;
3. (`--decoder-steps`) the VAE decoder alone, encoder frozen, so the latent space the UNet learned stays the same:
   the short first phase leaves the decoder's colours off (yellow decodes towards orange), and the decoder learns
   to map slightly perturbed latents (what sampling produces) to the clean image.

`--export FOLDER` writes a standard `StableDiffusionPipeline` folder (safetensors) from the EMA weights.
Scenes are drawn on the fly from `scfg.demo.data` with a fixed seed.

The grounding loss (`scenes`, weight `--grounding`) is TokenCompose's (Wang et al., "TokenCompose: Text-to-Image
Diffusion with Token-level Supervision", CVPR 2024), applied while training from scratch: every cross-attention
layer's head-averaged probabilities `A[p, t]` are read, and for each object (its size, colour and shape words) and
for the background (its word) with ground-truth mask `M` on the layer's grid,
- token term: `(1 - sum_p A[p, t] M[p] / sum_p A[p, t])^2` for each of the group's tokens (its attention lies on
  its unit),
- pixel term: the binary cross-entropy of `sum_{t in group} A[p, t]` against `M[p]` (the unit's pixels attend to
  its words),
weighted by `alpha_bar(t)` of the sample's timestep (a nearly pure-noise latent cannot say where an object is).
A model this small, trained for hours, does not learn attention that segments on its own (the first demo model's
region IoU is about 0.1); S-CFG presumes that it does, as it does in SD at scale, and this loss makes the testbed
such a model. The exported pipeline uses diffusers' stock attention processors; only training reads the maps.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .data import BACKGROUNDS, SCENE_VOCABULARY, SIZES, VOCABULARY, Scene, sample_scene, write_tokenizer

logger = logging.getLogger("scfg.demo.train")

IMAGE_SIZE = 64
MAX_TOKENS = 24


def _autoencoder(block_out_channels: tuple[int, ...]):
    """A small `AutoencoderKL` without attention whose latent is the image downsampled once per block after the
    first, 4 channels."""
    from diffusers import AutoencoderKL

    blocks = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
    )


def build_vae():
    """The `shapes` autoencoder: 64x64x3 <-> 32x32x4."""
    return _autoencoder((32, 64))


def build_unet():
    """The `shapes` UNet: cross-attention at latent/4 and latent/8 of a 32x32 latent."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 96, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def build_scenes_vae():
    """The `scenes` autoencoder: 64x64x3 <-> 16x16x4 (three blocks), no attention."""
    return _autoencoder((32, 64, 128))


def build_scenes_unet():
    """The `scenes` UNet: cross-attention at latent/1 (16x16, 64 channels) and latent/2 (8x8), plus the 4x4 mid
    block's; 5.8M parameters."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=4,  # diffusers' name for the number of heads here: 4 heads of 16 at latent/1
        norm_num_groups=16,
    )


@dataclass(frozen=True)
class Recipe:
    """What one demo model is: its data, its autoencoder and UNet, and the S-CFG levels its cross-attention has."""

    name: str
    vocabulary: tuple[str, ...]
    backgrounds: tuple[str, ...] | None
    build_vae: Callable
    build_unet: Callable
    levels: tuple[int, ...]  # S-CFG's `levels=` for the exported model
    grounding: float  # default weight of the grounding loss


RECIPES = {
    "shapes": Recipe("shapes", VOCABULARY, None, build_vae, build_unet, (4, 8), 0.0),
    "scenes": Recipe("scenes", SCENE_VOCABULARY, BACKGROUNDS, build_scenes_vae, build_scenes_unet, (1, 2), 0.005),
}


def build_text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",  # "trailing" starts at t=999, where the cosine schedule has alpha_bar ~ 3e-6
    )


def batch(
    rng: np.random.Generator, size: int, backgrounds: tuple[str, ...] | None = None
) -> tuple[torch.Tensor, list[Scene]]:
    scenes = [sample_scene(rng, backgrounds=backgrounds) for _ in range(size)]
    images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return images, scenes


class RecordingAttnProcessor:
    """Training-only processor for cross-attention: the classic `AttnProcessor`'s arithmetic (an explicit softmax),
    appending the head-averaged probabilities `[B, N, T]` to `store`. Only the modules it is set on use it."""

    def __init__(self, store: list[torch.Tensor]) -> None:
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if hidden_states.ndim != 3 or encoder_hidden_states is None or attention_mask is not None:
            raise ValueError("Expected the [B, N, C] cross-attention of a UNet transformer block, without a mask.")
        batch_size = hidden_states.shape[0]
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, None)  # [B * heads, N, T]
        out = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, value))))
        self.store.append(probs.unflatten(0, (batch_size, attn.heads)).mean(1))
        return out


def unit_tokens(caption: str) -> list[tuple[list[int], int | None]]:
    """The semantic units a `scenes` caption names: per object (`index` into the scene's objects) the token
    positions of its size, colour and shape words, and the background's word with index None. One token per word
    after the start token, so word `j` is position `j + 1`."""
    words = caption.split()
    units: list[tuple[list[int], int | None]] = []
    for j, word in enumerate(words):
        if word in SIZES:
            units.append(([j + 1, j + 2, j + 3], len(units)))
    if words and words[-1] in BACKGROUNDS:
        units.append(([len(words)], None))
    return units


def unit_masks(scene: Scene, grid: int) -> dict[int | None, torch.Tensor]:
    """Each unit's ground-truth mask as the fraction of each cell of a `grid x grid` layer it covers `[grid**2]`;
    the background (None) is what no object covers."""
    size = scene.image.shape[0]
    masks = {i: torch.from_numpy(o.mask.astype(np.float32)) for i, o in enumerate(scene.objects)}
    masks[None] = 1 - torch.stack(list(masks.values())).amax(0)
    cell = size // grid
    return {k: F.avg_pool2d(m[None, None], cell).flatten() for k, m in masks.items()}


def grounding_loss(
    maps: list[torch.Tensor], scenes: list[Scene], keep: list[bool], weights: torch.Tensor
) -> torch.Tensor:
    """TokenCompose's token and pixel terms (module docstring) averaged over layers, units and the kept samples
    (those whose caption was not dropped), each sample weighted by `weights` (`alpha_bar(t)`)."""
    total, count = maps[0].new_zeros(()), 0
    for b, scene in enumerate(scenes):
        if not keep[b]:
            continue
        units = unit_tokens(scene.caption)
        for probs in maps:
            grid = math.isqrt(probs.shape[1])
            masks = unit_masks(scene, grid)
            for positions, index in units:
                a, m = probs[b][:, positions], masks[index].to(probs.dtype)  # [N, k], [N]
                inside = (a * m[:, None]).sum(0) / a.sum(0).clamp_min(1e-8)
                token = (1 - inside).pow(2).mean()
                share = a.sum(1).clamp(1e-6, 1 - 1e-6)
                pixel = F.binary_cross_entropy(share, m)
                total = total + weights[b] * (token + pixel)
                count += 1
    return total / max(count, 1)


def learning_rate(args: argparse.Namespace, step: int) -> float:
    """200 warm-up steps, constant, then (with `--decay-from`/`--decay-to`) linear to 10% and constant after."""
    lr = args.lr * min(1.0, (step + 1) / 200)
    if args.decay_from is not None and step >= args.decay_from:
        span = max(1, args.decay_to - args.decay_from)
        lr *= 1.0 - 0.9 * min(1.0, (step - args.decay_from) / span)
    return lr


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1 - decay)


class Trainer:
    def __init__(self, args: argparse.Namespace) -> None:
        from transformers import CLIPTokenizer

        self.args = args
        self.recipe = RECIPES[args.recipe]
        os.makedirs(args.work, exist_ok=True)
        tok_dir = os.path.join(args.work, "tokenizer")
        if not os.path.exists(os.path.join(tok_dir, "vocab.json")):
            write_tokenizer(tok_dir, MAX_TOKENS, self.recipe.vocabulary)
        self.tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
        torch.manual_seed(args.seed)
        self.vae = self.recipe.build_vae()
        self.unet = self.recipe.build_unet()
        self.text_encoder = build_text_encoder(len(self.tokenizer))
        self.scheduler = build_scheduler()
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=1e-3, weight_decay=0.0)
        self.decoder_modules = (self.vae.decoder, self.vae.post_quant_conv)  # what phase 3 trains
        decoder_params = [p for module in self.decoder_modules for p in module.parameters()]
        self.decoder_opt = torch.optim.AdamW(decoder_params, lr=args.decoder_lr, weight_decay=0.0)
        params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        self.opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.ema_text = copy.deepcopy(self.text_encoder).requires_grad_(False)
        self.state = {
            "recipe": self.recipe.name,
            "vae_step": 0,
            "step": 0,
            "decoder_step": 0,
            "scaling_factor": None,
            "seconds": 0.0,
            "losses": [],
        }
        self.grounding = self.recipe.grounding if args.grounding is None else args.grounding
        self.ground_ema: float | None = None
        self.rng = np.random.default_rng(args.seed)
        self.path = os.path.join(args.work, "ckpt.pt")
        self.stopping = False  # set by SIGTERM/SIGINT: finish the step, save, exit
        if os.path.exists(self.path):
            self.load()

    # -- checkpoints ------------------------------------------------------------------------------------------

    def save(self) -> None:
        blob = {
            "vae": self.vae.state_dict(),
            "unet": self.unet.state_dict(),
            "text_encoder": self.text_encoder.state_dict(),
            "ema_unet": self.ema_unet.state_dict(),
            "ema_text": self.ema_text.state_dict(),
            "vae_opt": self.vae_opt.state_dict(),
            "decoder_opt": self.decoder_opt.state_dict(),
            "opt": self.opt.state_dict(),
            "state": self.state,
            "rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
        }
        tmp = self.path + ".tmp"
        torch.save(blob, tmp)
        os.replace(tmp, self.path)

    def load(self) -> None:
        blob = torch.load(self.path, weights_only=False)  # our own checkpoint, written by save()
        recipe = blob["state"].get("recipe", "shapes")  # checkpoints from before the recipes are `shapes`
        if recipe != self.recipe.name:
            raise SystemExit(f"{self.path} is a `{recipe}` checkpoint; pass --recipe {recipe} or another --work.")
        self.vae.load_state_dict(blob["vae"])
        self.unet.load_state_dict(blob["unet"])
        self.text_encoder.load_state_dict(blob["text_encoder"])
        self.ema_unet.load_state_dict(blob["ema_unet"])
        self.ema_text.load_state_dict(blob["ema_text"])
        if "vae_opt" in blob:  # a compact checkpoint (`--compact`) has none: the VAE phase is over
            self.vae_opt.load_state_dict(blob["vae_opt"])
        self.opt.load_state_dict(blob["opt"])
        if "decoder_opt" in blob:  # checkpoints from before the decoder phase have none
            self.decoder_opt.load_state_dict(blob["decoder_opt"])
        self.state = {"decoder_step": 0, "recipe": recipe, **blob["state"]}
        self.rng.bit_generator.state = blob["rng"]
        torch.set_rng_state(blob["torch_rng"])
        logger.info(
            "resumed at vae step %d, step %d, decoder step %d",
            self.state["vae_step"],
            self.state["step"],
            self.state["decoder_step"],
        )

    # -- phases ---------------------------------------------------------------------------------------------------

    def train_vae(self) -> None:
        args, last_save, ema_loss = self.args, time.time(), None
        while self.state["vae_step"] < args.vae_steps and not self.stopping:
            t0 = time.time()
            images, _ = batch(self.rng, args.vae_batch, self.recipe.backgrounds)
            dist = self.vae.encode(images).latent_dist
            recon = self.vae.decode(dist.sample()).sample
            loss = F.mse_loss(recon, images) + 1e-6 * dist.kl().mean()
            self.vae_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.vae_opt.step()
            self.state["vae_step"] += 1
            self.state["seconds"] += time.time() - t0
            ema_loss = loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss.item()
            if self.state["vae_step"] % 50 == 0:
                logger.info("vae step %d loss %.5f (%.2f s/step)", self.state["vae_step"], ema_loss, time.time() - t0)
            if time.time() - last_save > args.checkpoint_minutes * 60:
                self.save()
                last_save = time.time()
        if self.state["scaling_factor"] is None and not self.stopping:
            with torch.no_grad():
                images, _ = batch(self.rng, 256, self.recipe.backgrounds)
                latents = self.vae.encode(images).latent_dist.mean
            self.state["scaling_factor"] = float(1.0 / latents.std())
            logger.info("vae scaling factor %.4f", self.state["scaling_factor"])
            self.save()

    def record_schedule(self) -> None:
        """Append this run's lr settings to `state["lr_schedule"]` when they differ from the previous run's, so that
        a run resumed with other settings still documents how it was trained."""
        args, runs = self.args, self.state.setdefault("lr_schedule", [])
        settings = {"lr": args.lr, "decay_from": args.decay_from, "decay_to": args.decay_to}
        if self.grounding:
            settings["grounding"] = self.grounding
        if not runs or {k: runs[-1][k] for k in settings} != settings:
            runs.append({"from_step": self.state["step"], **settings})

    def encode_text(self, encoder: torch.nn.Module, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
        ).input_ids
        return encoder(ids)[0]

    def train_diffusion(self) -> None:
        args, last_save, ema_loss = self.args, time.time(), None
        self.vae.requires_grad_(False).eval()
        sf = self.state["scaling_factor"]
        self.record_schedule()
        maps: list[torch.Tensor] = []
        if self.grounding:
            self.unet.set_attn_processor(
                {
                    name: RecordingAttnProcessor(maps) if ".attn2." in name and not name.startswith("mid_block") else p
                    for name, p in self.unet.attn_processors.items()
                }
            )
        alphas = self.scheduler.alphas_cumprod
        while self.state["step"] < args.steps and not self.stopping:
            t0 = time.time()
            images, scenes = batch(self.rng, args.batch, self.recipe.backgrounds)
            keep = [bool(self.rng.random() >= args.caption_dropout) for _ in scenes]
            captions = [s.caption if k else "" for s, k in zip(scenes, keep, strict=True)]
            with torch.no_grad():
                latents = self.vae.encode(images).latent_dist.mean * sf
            noise = torch.randn_like(latents)
            t = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],))
            noisy = self.scheduler.add_noise(latents, noise, t)
            lr = learning_rate(args, self.state["step"])
            for group in self.opt.param_groups:
                group["lr"] = lr
            maps.clear()
            pred = self.unet(noisy, t, encoder_hidden_states=self.encode_text(self.text_encoder, captions)).sample
            loss = F.mse_loss(pred, noise)
            if self.grounding and any(keep):
                ground = grounding_loss(maps, scenes, keep, alphas[t].float())
                loss = loss + self.grounding * ground
                self.ground_ema = (
                    ground.item() if self.ground_ema is None else 0.98 * self.ground_ema + 0.02 * ground.item()
                )
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(self.unet.parameters()) + list(self.text_encoder.parameters()), 1.0)
            self.opt.step()
            step = self.state["step"] = self.state["step"] + 1
            decay = min(args.ema, (1 + step) / (10 + step))
            ema_update(self.ema_unet, self.unet, decay)
            ema_update(self.ema_text, self.text_encoder, decay)
            self.state["seconds"] += time.time() - t0
            ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
            if step % 50 == 0:
                self.state["losses"].append((step, round(ema_loss, 5)))
                if self.ground_ema is not None:
                    self.state.setdefault("grounding_losses", []).append((step, round(self.ground_ema, 5)))
                logger.info(
                    "step %d loss %.5f grounding %s (%.2f s/step, %.0f s total)",
                    step,
                    ema_loss,
                    "-" if self.ground_ema is None else f"{self.ground_ema:.4f}",
                    time.time() - t0,
                    self.state["seconds"],
                )
            if time.time() - last_save > args.checkpoint_minutes * 60:
                self.save()
                last_save = time.time()
        self.save()

    def train_decoder(self) -> None:
        """Fine-tune the decoder on the frozen encoder's latents plus Gaussian noise of a random level in
        [0, `--decoder-noise`] (in the UNet's scaled units), reconstruction MSE."""
        args, last_save, ema_loss = self.args, time.time(), None
        sf = self.state["scaling_factor"]
        if args.decoder_steps > self.state["decoder_step"]:
            settings = {"lr": args.decoder_lr, "noise": args.decoder_noise, "batch": args.batch}
            self.state.setdefault("decoder", settings)  # the settings of the run that started the phase
        self.vae.requires_grad_(False)
        for module in self.decoder_modules:
            module.requires_grad_(True)
        while self.state["decoder_step"] < args.decoder_steps and not self.stopping:
            t0 = time.time()
            images, _ = batch(self.rng, args.batch, self.recipe.backgrounds)
            with torch.no_grad():
                latents = self.vae.encode(images).latent_dist.mean
                level = torch.rand(latents.shape[0], 1, 1, 1) * args.decoder_noise / sf
                latents = latents + level * torch.randn_like(latents)
            loss = F.mse_loss(self.vae.decode(latents).sample, images)
            self.decoder_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.decoder_opt.step()
            step = self.state["decoder_step"] = self.state["decoder_step"] + 1
            self.state["seconds"] += time.time() - t0
            ema_loss = loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss.item()
            if step % 50 == 0:
                logger.info("decoder step %d loss %.5f (%.2f s/step)", step, ema_loss, time.time() - t0)
            if time.time() - last_save > args.checkpoint_minutes * 60:
                self.save()
                last_save = time.time()
        self.vae.requires_grad_(False)
        self.save()

    # -- export ---------------------------------------------------------------------------------------------------

    def export(self, folder: str) -> None:
        """Write the EMA weights as a StableDiffusionPipeline folder (UNet stored in float16: under 20 MB in all),
        a sample grid, the model card and the checksums of every file."""
        from diffusers import StableDiffusionPipeline

        vae = copy.deepcopy(self.vae)
        vae.register_to_config(scaling_factor=self.state["scaling_factor"])
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=self.ema_text,
            tokenizer=self.tokenizer,
            unet=copy.deepcopy(self.ema_unet).to(torch.float16),
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(folder, safe_serialization=True)
        write_slow_tokenizer_files(os.path.join(folder, "tokenizer"))
        keys = (
            "recipe",
            "vae_step",
            "step",
            "decoder_step",
            "decoder",
            "scaling_factor",
            "seconds",
            "losses",
            "grounding_losses",
            "lr_schedule",
        )
        state = {k: self.state[k] for k in keys if k in self.state}
        state["scfg_levels"] = list(self.recipe.levels)
        with open(os.path.join(folder, "training_state.json"), "w") as f:
            json.dump(state, f, indent=1)
        write_checksums(folder)


def compact_checkpoint(source: str, target: str) -> None:
    """Write `source`'s checkpoint without the finished VAE phase's optimizer and with the Adam moments in bfloat16
    (loading casts them back to float32), about 80 MB for the `scenes` recipe instead of 126: small enough to keep
    in the repository so that a later session resumes the run. Weights, EMA weights and the RNG states are kept
    exactly."""
    blob = torch.load(source, weights_only=False)  # our own checkpoint, written by Trainer.save()
    if blob["state"]["vae_step"] == 0 or blob["state"].get("scaling_factor") is None:
        raise SystemExit("Expected a checkpoint past its VAE phase; compact it once the diffusion phase has begun.")
    blob.pop("vae_opt", None)
    for state in blob["opt"]["state"].values():
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = state[key].to(torch.bfloat16)
    torch.save(blob, target)


def write_slow_tokenizer_files(folder: str) -> None:
    """Write `vocab.json` and `merges.txt` beside a CLIP `tokenizer.json`: transformers 4.x's `CLIPTokenizer` loads
    from them (5.x saves only `tokenizer.json`; 4.x's slow tokenizer saves them itself); the ids are the same."""
    if not os.path.exists(os.path.join(folder, "tokenizer.json")):
        return
    with open(os.path.join(folder, "tokenizer.json")) as f:
        model = json.load(f)["model"]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(model["vocab"], f)
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("\n".join(["#version: 0.2", *merges]) + "\n")


def write_checksums(folder: str) -> None:
    """`CHECKSUMS.sha256`: one `sha256  relative/path` line per weights and config file of the pipeline."""
    import hashlib

    lines = []
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel in ("CHECKSUMS.sha256", "README.md", "samples.png", "LICENSE"):
                continue
            with open(path, "rb") as f:
                lines.append(f"{hashlib.sha256(f.read()).hexdigest()}  {rel}")
    with open(os.path.join(folder, "CHECKSUMS.sha256"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="folder for the resumable checkpoint and tokenizer")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="shapes", help="which demo model to train")
    parser.add_argument(
        "--grounding", type=float, default=None, help="grounding-loss weight (default: the recipe's; 0 turns it off)"
    )
    parser.add_argument("--export", help="write a StableDiffusionPipeline folder from the EMA weights and stop")
    parser.add_argument(
        "--compact", help="write a smaller copy of the checkpoint to this file (to keep in git) and stop"
    )
    parser.add_argument("--vae-steps", type=int, default=700)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--decay-from", type=int, default=None, help="step where the lr starts its linear decay")
    parser.add_argument("--decay-to", type=int, default=None, help="step where the decay reaches 10%% of --lr")
    parser.add_argument("--decoder-steps", type=int, default=850, help="phase 3: decoder fine-tuning steps")
    parser.add_argument("--decoder-lr", type=float, default=5e-4)
    parser.add_argument("--decoder-noise", type=float, default=0.1, help="largest latent noise level in phase 3")
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if (args.decay_from is None) != (args.decay_to is None) or (
        args.decay_from is not None and args.decay_to <= args.decay_from
    ):
        parser.error("--decay-from and --decay-to go together, with --decay-to > --decay-from")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compact:
        compact_checkpoint(os.path.join(args.work, "ckpt.pt"), args.compact)
        return
    trainer = Trainer(args)
    if args.export:
        trainer.export(args.export)
        return

    def stop(signum, frame):
        logger.info("signal %d: saving the checkpoint and stopping", signum)
        trainer.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    trainer.train_vae()
    if trainer.stopping:
        trainer.save()
        return
    trainer.train_diffusion()
    if not trainer.stopping:
        trainer.train_decoder()


if __name__ == "__main__":
    main()
