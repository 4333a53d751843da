"""S-CFG as a diffusers guider (`BaseGuidance`), for modular pipelines.

```py
from scfg.integration.guider import SemanticGuider

pipe.update_components(guider=SemanticGuider(guidance_scale=7.5))
```

Modular pipelines run the conditional and unconditional batches as separate denoiser passes, wrapped in
`prepare_models` / `cleanup_models`, and combine them in the guider's `forward`. The guider is the step engine's
caller for such a loop: the engine's hooks are installed for each pass (`SemanticGuidance.observe`), record that
pass's maps as for any separate-pass pipeline (`CFGLayout("separate", ("cond", "uncond"))`), and `forward` asks the
engine for the rewritten unconditional prediction (`guide_pair`) before the usual CFG line.

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

from ..config import SCFGConfig, SCFGError
from ..engine import CFGLayout
from .pipeline import SemanticGuidance

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
        self._observer: Any = None  # the engine's hooks, installed for one denoiser pass

    def _engine_for(self, denoiser: nn.Module) -> SemanticGuidance:
        if self._engine is None or self._engine.denoiser is not denoiser:
            holder = _as_pipeline(denoiser)
            holder.guidance_rescale = self.guidance_rescale  # read only where both CFG predictions are replaced
            # modular pipelines run `pred_cond`, then `pred_uncond` (`_input_predictions`), and combine them here
            self._engine = SemanticGuidance(
                holder, self.scfg_config or "official", layout=self._layout(), deliver="caller"
            )
            self._engine.new_call()
        self._engine.on_step = self.on_step
        self._engine.layout = self._layout()
        return self._engine

    def _layout(self) -> CFGLayout:
        return CFGLayout("separate", ("cond", "uncond"), "uncond", float(self.guidance_scale))

    def set_state(self, step: int, num_inference_steps: int, timestep: torch.LongTensor) -> None:
        super().set_state(step, num_inference_steps, timestep)
        if self._engine is not None:
            if step == 0:  # a new sampling run: nothing of the last one carries over
                self._engine.new_call()
            self._engine.set_step(step, num_inference_steps)

    def prepare_models(self, denoiser: nn.Module) -> None:
        super().prepare_models(denoiser)
        if not self._is_cfg_enabled():
            return
        engine = self._engine_for(denoiser)
        engine.set_step(self._step, self._num_inference_steps)
        self._observer = engine.observe()
        self._observer.__enter__()

    def cleanup_models(self, denoiser: nn.Module) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.__exit__(None, None, None)

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None):
        if not self._is_cfg_enabled() or pred_uncond is None or self._engine is None:
            return super().forward(pred_cond, pred_uncond)
        new_uncond, new_cond = self._engine.guide_pair(pred_uncond, pred_cond)
        # CFG on (uncond', cond) is S-CFG's guided prediction; the rescale sees the model's own cond
        return super().forward(new_cond, new_uncond)
