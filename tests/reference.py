"""A deliberately plain float64 reference of S-CFG, written from docs/algorithm.md without the library's code.

Loops over samples, layers, tokens and pixels; explicit matrix powers; hand-indexed reflect padding. Slow and
obvious on purpose: the optimised library path is compared against it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class NaiveAttnProcessor:
    """Computes attention by materialising softmax(QK^T) per head and records the head-averaged probabilities."""

    def __init__(self, name: str, store: dict):
        self.name = name
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        b, q_len, _ = hidden_states.shape
        q = attn.to_q(hidden_states)
        k = attn.to_k(context)
        v = attn.to_v(context)
        heads = attn.heads
        d = q.shape[-1] // heads
        q = q.view(b, -1, heads, d).transpose(1, 2)
        k = k.view(b, -1, heads, d).transpose(1, 2)
        v = v.view(b, -1, heads, d).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        self.store[self.name] = probs.mean(dim=1).detach().clone()
        out = (probs @ v).transpose(1, 2).reshape(b, q_len, heads * d)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def gaussian_weights(sigma=0.5):
    w = [math.exp(-((d / (2 * sigma)) ** 2)) for d in (-1, 0, 1)]
    s = sum(w)
    return [x / s for x in w]


def reflect(i, n):
    if n == 1:
        return 0
    if i < 0:
        return -i
    if i >= n:
        return 2 * (n - 1) - i
    return i


def gaussian_blur(img):
    """3x3 Gaussian of [..., h, w] maps with reflect padding 1: an explicit sum of nine shifted copies."""
    h, w = img.shape[-2:]
    k = gaussian_weights()
    rows = torch.tensor([reflect(y, h) for y in range(-1, h + 1)])
    cols = torch.tensor([reflect(x, w) for x in range(-1, w + 1)])
    padded = img[..., rows, :][..., cols]
    out = torch.zeros_like(img)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out = out + k[dy + 1] * k[dx + 1] * padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
    return out


def ceil_grid(hw, level):
    h, w = hw
    while level > 1:
        h, w, level = (h + 1) // 2, (w + 1) // 2, level // 2
    return h, w


def reference_maps(probs, layers, latent_hw, sample, completion="official", order=4, smoothing=True):
    """Token maps [T, h, w] and foreground maps [2, h, w] of one batch index, averaged over layers."""
    mask_hw = ceil_grid(latent_hw, min(level for _, _, level in layers))
    token_sum, fg_sum = None, None
    for cross_name, self_name, level in layers:
        C = probs[cross_name][sample].double()
        S = probs[self_name][sample].double()
        if completion == "official":
            S2 = (S + 3 * (S @ S)) / 4
        elif completion == "power_mean":
            S2 = sum(torch.linalg.matrix_power(S, r) for r in range(1, order + 1)) / order
        else:
            S2 = torch.eye(S.shape[0], dtype=S.dtype)
        Cc = S2 @ C
        h, w = ceil_grid(latent_hw, level)
        maps = Cc.T.reshape(-1, h, w)
        if (h, w) != mask_hw:
            maps = F.interpolate(maps[None], size=mask_hw, mode="bilinear", align_corners=False)[0]
        if smoothing:
            maps = gaussian_blur(maps)
        token = torch.stack([m / (m.mean() + 1e-8) for m in maps])
        fg = torch.stack([maps[0], maps[1:].sum(0)])
        fg = torch.stack([m / (m.mean() + 1e-8) for m in fg])
        token_sum = token if token_sum is None else token_sum + token
        fg_sum = fg if fg_sum is None else fg_sum + fg
    return token_sum / len(layers), fg_sum / len(layers)


def reference_rate(eps_u, eps_c, token_masks, fg_mask, g, clamp=(0.8, 3.0), cap=15.0, smoothing=True):
    """Rate map [H, W] for one sample; masks on the mask grid, nearest-upsampled here pixel by pixel."""
    _C, H, W = eps_c.shape
    T, h, w = token_masks.shape
    # nearest: source index floor(dst * in / out)
    ys = [min(math.floor(y * h / H), h - 1) for y in range(H)]
    xs = [min(math.floor(x * w / W), w - 1) for x in range(W)]
    tm = token_masks[:, ys][:, :, xs]
    fm = fg_mask[ys][:, xs]
    eta = eps_c.double() - eps_u.double()
    n = torch.sqrt((eta**2).sum(0))
    fg_mean = (n * fm).sum() / fm.sum() if fm.sum() > 0 else torch.tensor(0.0, dtype=torch.float64)
    rates = []
    for i in range(T):
        count = tm[i].sum()
        if count == 0:
            rates.append(0.0)
            continue
        region_mean = (n * tm[i]).sum() / count
        rates.append(float(fg_mean / region_mean) if region_mean > 0 else 0.0)
    rate = torch.zeros(H, W, dtype=torch.float64)
    for i in range(T):
        rate += rates[i] * tm[i]
    if clamp is not None:
        rate = rate.clamp(clamp[0], clamp[1])
    if cap is not None:
        rate = torch.minimum(rate, torch.full_like(rate, cap / g))
    if smoothing:
        rate = gaussian_blur(rate)
    return rate, torch.tensor(rates, dtype=torch.float64)


def reference_step(probs, layers, latent_hw, eps, g, preset="official"):
    """Guided prediction [B, C, H, W] for the batch [uncond (B), cond (B)]; also masks and rates per sample."""
    official = preset == "official"
    b = eps.shape[0] // 2
    eps_u, eps_c = eps[:b].double(), eps[b:].double()
    out, all_masks, all_fg, all_rates, all_maps = [], [], [], [], []
    for i in range(b):
        tok_c, _ = reference_maps(
            probs, layers, latent_hw, b + i, "official" if official else "power_mean", smoothing=official
        )
        _, fg_u = reference_maps(
            probs, layers, latent_hw, i, "official" if official else "power_mean", smoothing=official
        )
        best = tok_c.max(dim=0).values
        if official:
            masks = (tok_c == best).double()  # ties: multi-hot
        else:
            masks = torch.zeros_like(tok_c)
            idx = tok_c.argmax(dim=0)
            for y in range(idx.shape[0]):
                for x in range(idx.shape[1]):
                    masks[idx[y, x], y, x] = 1.0
        fg = (fg_u[1] > fg_u[0]).double()
        rate, rates = reference_rate(
            eps_u[i],
            eps_c[i],
            masks,
            fg,
            g,
            clamp=(0.8, 3.0) if official else None,
            cap=15.0 if official else None,
            smoothing=official,
        )
        out.append(eps_u[i] + g * rate * (eps_c[i] - eps_u[i]))
        all_masks.append(masks)
        all_fg.append(fg)
        all_rates.append(rates)
        all_maps.append(tok_c)
    return torch.stack(out), torch.stack(all_masks), torch.stack(all_fg), torch.stack(all_rates), torch.stack(all_maps)
