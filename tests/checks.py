"""Relations every family's pipeline test checks the same way."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import scfg
from scfg.families import family_for


def explode(pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
    """A `callback_on_step_end` that raises at step 1."""
    if step == 1:
        raise RuntimeError("boom")
    return kwargs


def assert_restored_after_exception(pipe: Any, call: Callable[[Callable], Any]) -> None:
    """`call(callback)` runs `pipe` with `callback_on_step_end=callback` inside `scfg.enable`: the callback raises,
    and afterwards the pipeline's class is its own, nothing records, and no denoiser keeps a hook."""
    cls = type(pipe)
    denoisers = family_for(pipe).denoisers(pipe).values()
    guard = scfg.enable(pipe)
    with pytest.raises(RuntimeError, match="boom"), guard:
        call(explode)
    assert type(pipe) is cls and not guard.recording
    assert not any(m._forward_hooks or m._forward_pre_hooks for d in denoisers for m in d.modules())
