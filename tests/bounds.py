"""Rounding bounds that tests compare against, each derived in its docstring from the operations it covers."""

from __future__ import annotations

import torch


def softmax_rtol(query: torch.Tensor, key: torch.Tensor, scale: float) -> float:
    """Relative bound on how far two computations of head-averaged `softmax(q kᵀ · scale)` may differ.

    For `query [B, heads, Q, d]` and `key [B, heads, K, d]` that both computations share bit for bit (the same
    projection modules applied to the same tensors), in the dtype of `query`, with unit roundoff `u = eps / 2`:

    - each logit is a `d`-term dot product plus one rounding for the scale (on `q` or on the score), so each side
      is within `(d + 1)·u·S` of the exact logit, `S = max Σ_t |q_t|·|k_t|·scale`; the two sides differ by
      `2(d + 1)·u·S`;
    - the softmax subtracts the row maximum (one more rounding of `|s − max| <= 2S` per side), so the exponents
      differ by at most `2·2(d + 1)·u·S + 2·2S·u = 4(d + 2)·u·S`; `exp` adds `u` per side;
    - the denominator, a `K`-term sum, differs relatively by the worst numerator plus `(K − 1)·u` per side; the
      division adds `u` per side;
    - the head mean (`heads`-term sum, one division) adds `heads·u` per side.

    The total relative difference of each probability is `(4(d + 2)·S + K + heads + 2)·eps`, at most. It is
    relative per entry, so it is the right bound for small probabilities too (down to the dtype's smallest normal
    number; pass `atol=torch.finfo(dtype).tiny` alongside it).
    """
    heads, num_keys, d = query.shape[1], key.shape[2], query.shape[-1]
    eps = torch.finfo(query.dtype).eps
    s = float((query.detach().abs() @ key.detach().abs().transpose(-1, -2)).amax()) * scale
    return (4 * (d + 2) * s + num_keys + heads + 2) * eps
