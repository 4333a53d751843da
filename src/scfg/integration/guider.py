"""S-CFG as a diffusers guider (`BaseGuidance`), for modular pipelines.

```py
from scfg.integration.guider import SemanticGuider

pipe.update_components(guider=SemanticGuider(guidance_scale=7.5))
```

Modular pipelines run the conditional and unconditional batches as separate denoiser passes, wrapped in
`prepare_models` / `cleanup_models`. The guider records attention only during those passes (hooks installed in
`prepare_models`, removed in `cleanup_models`), then combines the two passes' maps exactly as the stock-pipeline
integration combines the two halves of its `[uncond, cond]` batch.

Needs diffusers >= 0.36 (the guider API it builds on: `GuiderOutput`, `set_state`, `prepare_models`,
`cleanup_models`). On older diffusers this module still imports, and `SemanticGuider(...)` raises `SCFGError`;
`scfg.enable` works there as usual.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import diffusers
import torch
from diffusers.configuration_utils import register_to_config
from torch import nn

from ..capture import CapturedPass
from ..config import SCFGConfig, SCFGError
from .pipeline import SemanticGuidance, _Pass

__all__ = ["SemanticGuider"]

MIN_DIFFUSERS = "0.36"  # first release whose guiders return `GuiderOutput` (0.35's preview returns a tuple)

try:
    from diffusers.guiders import ClassifierFreeGuidance
    from diffusers.guiders.guider_utils import GuiderOutput  # noqa: F401  (only its presence is checked)
except ImportError:  # diffusers < 0.36: no guiders, or the 0.35 preview with another API
    ClassifierFreeGuidance = None


def _require_guiders() -> None:
    if ClassifierFreeGuidance is None:
        raise SCFGError(
            f"Expected diffusers>={MIN_DIFFUSERS} for `SemanticGuider` (the modular-pipeline guider API), "
            f"but diffusers {diffusers.__version__} is installed. Upgrade diffusers, or use `scfg.enable(pipe)` "
            "with a stock pipeline, which works on this version."
        )


def _as_pipeline(denoiser: nn.Module) -> Any:
    """The attributes the family lookup reads, for a bare denoiser."""
    if hasattr(denoiser, "transformer_blocks") and not hasattr(denoiser, "down_blocks"):
        return SimpleNamespace(transformer=denoiser)
    if getattr(denoiser.config, "addition_embed_type", None) == "text_time":  # SDXL's UNet
        return SimpleNamespace(unet=denoiser, text_encoder_2=None)
    return SimpleNamespace(unet=denoiser)


class SemanticGuider(ClassifierFreeGuidance or object):
    """Semantic-aware CFG (Shen et al., CVPR 2024) as a guider. Needs diffusers >= 0.36.

    Args:
        guidance_scale, guidance_rescale, start, stop, enabled: as in `ClassifierFreeGuidance`.
        scfg_config (`dict`, *optional*): `SCFGConfig.to_dict()` values; the family's `official` preset if `None`.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> SemanticGuider:
        _require_guiders()  # before `register_to_config`, which needs a real `ConfigMixin`
        return super().__new__(cls)

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        use_original_formulation: bool = False,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
        scfg_config: dict | None = None,
    ) -> None:
        if use_original_formulation:
            raise SCFGError("Expected `use_original_formulation=False`: S-CFG rescales `g * (cond - uncond)`.")
        super().__init__(guidance_scale, guidance_rescale, False, start, stop, enabled)
        self.scfg_config = SCFGConfig.from_dict(scfg_config) if scfg_config is not None else None
        self.on_step = None  # set to a callable (e.g. scfg.Recorder()) for per-step reports
        self._engine: SemanticGuidance | None = None
        self._passes: dict[str, CapturedPass] = {}
        self._reuse = False  # `mask_interval > 1`: this step reuses the engine's last regions, captures nothing
        self._handle: Any = None

    def _engine_for(self, denoiser: nn.Module) -> SemanticGuidance:
        if self._engine is None or self._engine.denoiser is not denoiser:
            holder = _as_pipeline(denoiser)
            holder.guidance_rescale = self.guidance_rescale  # read only where both CFG halves are replaced
            self._engine = SemanticGuidance(holder, self.scfg_config or "official")
            self._engine.new_call()
        self._engine.on_step = self.on_step
        return self._engine

    def set_state(self, step: int, num_inference_steps: int, timestep: torch.LongTensor) -> None:
        super().set_state(step, num_inference_steps, timestep)
        self._passes = {}
        self._reuse = False
        if step == 0 and self._engine is not None:  # a new sampling run: nothing of the last one carries over
            self._engine.new_call()

    def prepare_models(self, denoiser: nn.Module) -> None:
        super().prepare_models(denoiser)
        if not self._is_cfg_enabled():
            return
        engine = self._engine_for(denoiser)
        capture = engine._capture
        capture.__enter__()
        family = engine.family

        def begin(module: nn.Module, args: tuple, kwargs: dict) -> None:
            latent_hw = family.latent_hw(args, kwargs)
            # each pass holds one half of the CFG batch
            if engine.can_reuse(self._step, latent_hw, 2 * family.batch_size(args, kwargs)):
                self._reuse = True
                return
            capture.begin(latent_hw)

        self._handle = denoiser.register_forward_pre_hook(begin, with_kwargs=True)

    def cleanup_models(self, denoiser: nn.Module) -> None:
        if self._handle is None:
            return
        self._handle.remove()
        self._handle = None
        engine = self._engine_for(denoiser)
        captured = engine._capture.finish()
        engine._capture.__exit__(None, None, None)
        if captured is not None:
            # the first prepared batch is `pred_cond`, the second `pred_uncond` (`_input_predictions` order)
            self._passes[self._input_predictions[self._count_prepared - 1]] = captured

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None):
        cond, uncond = self._passes.get("pred_cond"), self._passes.get("pred_uncond")
        captured = cond is not None and uncond is not None
        if not self._is_cfg_enabled() or pred_uncond is None or not (captured or self._reuse):
            return super().forward(pred_cond, pred_uncond)
        engine = self._engine
        merged = None
        if captured:
            merged = CapturedPass(
                latent_hw=cond.latent_hw, probs={k: torch.cat([uncond.probs[k], cond.probs[k]]) for k in cond.probs}
            )
        timestep = float(torch.as_tensor(self._timestep).flatten()[0]) if self._timestep is not None else 0.0
        current = _Pass(step=self._step, timestep=timestep, guidance_scale=float(self.guidance_scale))
        guided = engine.guide(torch.cat([pred_uncond, pred_cond]), merged, current)
        self._passes = {}
        new_uncond, new_cond = guided.chunk(2)
        # CFG on (uncond', cond) is S-CFG's guided prediction; the rescale sees the model's own cond
        return super().forward(new_cond, new_uncond)
