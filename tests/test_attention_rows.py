"""`AttentionRows`: head-averaged attention formed in chunks within a memory budget, and the chunked completion
(docs/algorithm.md step 2a)."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from scfg.attention import AttentionRows, peak_extra_bytes
from scfg.capture import head_averaged_softmax
from scfg.segment import complete_cross_attention

U32 = 2.0**-24  # unit roundoff of float32

B, H, D, IMAGE, TEXT = 2, 3, 4, 24, 7  # batch, heads, head dim, image tokens (a 4x6 grid), text tokens
SCALE = D**-0.5

# The chunked and the dense completion differ only in the order of additions: the H head terms of each probability
# (one head per chunk vs one sum over heads) and the grouping of each K-term dot product. Every value is a convex
# combination of probabilities (rows of S sum to 1, C's entries are at most 1), so an ulp is at most 1.2e-7, and a
# difference in one product is not amplified by the next (S's rows sum to 1). Rounding of reordered sums of random
# terms grows like sqrt(n) ulps (the worst case n ulps needs adversarial terms): with n <= H + K = 34 and up to 4
# products that is about 4 * 6 * 6e-8 = 1.4e-6 at values near 1, and the values here are below 0.5 (cross
# probabilities over several tokens), so 1e-6 holds with margin (observed: about 1e-7).
ATOL = 1e-6


def projections(keys: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries `[B, H, IMAGE, D]` and keys `[B, H, keys, D]` laid out as a processor makes them: `[B, L, H D]` viewed
    and transposed (not contiguous)."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(B, IMAGE, H * D, generator=g).to(dtype).view(B, IMAGE, H, D).transpose(1, 2)
    key = torch.randn(B, keys, H * D, generator=g).to(dtype).view(B, keys, H, D).transpose(1, 2)
    return query, key


def cross_probs(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, IMAGE, 5, generator=g).mul(3).softmax(-1).to(dtype)


def key_mask_bias(keys: int) -> torch.Tensor:
    """`[B, 1, 1, K]`: the last two keys of sample 0 and the first key of sample 1 masked, as diffusers does."""
    bias = torch.zeros(B, 1, 1, keys)
    bias[0, ..., -2:] = -10000.0
    bias[1, ..., 0] = float("-inf")
    return bias


def naive_rows(query, key, bias=None) -> torch.Tensor:
    scores = (query.float() @ key.float().transpose(-1, -2)) * SCALE
    if bias is not None:
        scores = scores + bias
    return scores.softmax(-1).mean(dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_rows_do_not_depend_on_budget_or_chunk(dtype):
    query, key = projections(IMAGE, dtype)
    bias = key_mask_bias(IMAGE)
    rows = AttentionRows(query, key, SCALE, bias).dense()
    assert rows.shape == (B, IMAGE, IMAGE)
    assert rows.dtype == torch.promote_types(dtype, torch.float32)
    # every element is the sum of its heads in head order whatever the blocks; what a block can change is the
    # matmul's rounding of each d-term score (a kernel for other row counts): by at most d ulps of
    # scale * sum_i |q_i k_i| (the error bound of a d-term dot product), a logit change of delta moves each
    # probability by at most 2 delta p <= 2 delta, and the head mean of such changes is as small: atol 2 delta,
    # plus 2 ulps for the final division's rounding
    unit = torch.finfo(rows.dtype).eps / 2
    delta = D * unit * SCALE * (query.abs().to(rows.dtype) @ key.abs().to(rows.dtype).transpose(-1, -2)).max().item()
    row = B * IMAGE * rows.dtype.itemsize
    for budget, chunk in ((1, 1), (5 * row, 2 * row), (IMAGE * row, 1), (1 << 30, 1 << 30)):
        blocked = AttentionRows(query, key, SCALE, bias, budget=budget, chunk=chunk).rows(0, IMAGE)
        torch.testing.assert_close(blocked, rows, rtol=0, atol=2 * delta + 2 * unit)
    # and the rows are the softmax: float32 sums of H terms <= 1 reordered, within a few ulps (float64: exact to
    # its own rounding, far below float32's)
    expected = naive_rows(query.double(), key.double(), bias.double())
    torch.testing.assert_close(rows.double(), expected, rtol=0, atol=8 * U32)
    # `capture.head_averaged_softmax` is these rows
    assert torch.equal(head_averaged_softmax(query, key, SCALE), AttentionRows(query, key, SCALE).dense())


def test_bias_masks_keys():
    query, key = projections(IMAGE)
    bias = key_mask_bias(IMAGE)
    dense = AttentionRows(query, key, SCALE, bias).dense()
    # float32 softmax of scores reordered by the head-mean: within a few ulps of values <= 1
    torch.testing.assert_close(dense, naive_rows(query, key, bias), rtol=0, atol=8 * U32)
    assert dense[0, :, -2:].max() < 1e-30 and torch.all(dense[1, :, 0] == 0)


def test_column_block_is_renormalised_block_of_full_rows():
    query, key = projections(IMAGE + TEXT)
    full = AttentionRows(query, key, SCALE).dense()
    for columns in (slice(0, IMAGE), slice(IMAGE, None), slice(-3, None)):
        block = full[..., columns]
        expected = block / block.sum(-1, keepdim=True).clamp_min(1e-12)
        assert torch.equal(AttentionRows(query, key, SCALE).select(columns).dense(), expected)
        assert torch.equal(AttentionRows(query, key, SCALE, columns=columns).dense(), block)


def test_renormalised_column_blocks_sum_to_one():
    query, key = projections(IMAGE + TEXT)
    joint = AttentionRows(query, key, SCALE, key_mask_bias(IMAGE + TEXT))
    for columns, kept in ((slice(0, IMAGE), IMAGE), (slice(IMAGE, None), TEXT)):
        sums = joint.select(columns).dense().sum(-1)
        # each of the `kept` quotients rounds once (u), and their float32 sum adds (kept - 1) u
        torch.testing.assert_close(sums, torch.ones(B, IMAGE), rtol=0, atol=(2 * kept) * U32)


@pytest.mark.parametrize("completion", ["official", "power_mean"])
@pytest.mark.parametrize("case", ["plain", "key_mask", "per_head_bias", "joint"])
def test_chunked_completion_matches_dense(completion, case):
    keys = IMAGE + TEXT if case == "joint" else IMAGE
    query, key = projections(keys)
    bias = None
    if case in ("key_mask", "joint"):
        bias = key_mask_bias(keys)
    elif case == "per_head_bias":
        bias = torch.randn(B, H, IMAGE, keys, generator=torch.Generator().manual_seed(2))
    # three query rows of one head at a time: 8 row chunks, each of 3 head chunks
    budget = 3 * B * keys * 4
    chunked = AttentionRows(query, key, SCALE, bias, budget=budget)
    full = AttentionRows(query, key, SCALE, bias).dense()
    if case == "joint":
        chunked = chunked.select(slice(0, IMAGE))
        block = full[..., :IMAGE]
        full = block / block.sum(-1, keepdim=True).clamp_min(1e-12)
    cross = cross_probs()
    expected = complete_cross_attention(cross, full, completion)
    torch.testing.assert_close(complete_cross_attention(cross, chunked, completion), expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(chunked.rows(5, 17), full[:, 5:17], rtol=0, atol=ATOL)


def test_matmul_with_budget_below_one_row():
    query, key = projections(IMAGE)
    rows = AttentionRows(query, key, SCALE, budget=1)  # one row of one head at a time
    x = cross_probs()
    torch.testing.assert_close(rows.matmul(x), torch.bmm(rows.dense(), x), rtol=0, atol=ATOL)


def test_matmul_with_large_budget_uses_dense_rows():
    query, key = projections(IMAGE)
    rows = AttentionRows(query, key, SCALE, budget=1 << 30)
    x = cross_probs()
    dense = AttentionRows(query, key, SCALE, budget=1 << 30).dense()
    # the very same dense matrix (bit for bit) multiplies every time
    assert torch.equal(rows.matmul(x), torch.bmm(dense, x))
    assert torch.equal(rows.matmul(x.flip(1)), torch.bmm(dense, x.flip(1)))
    assert torch.equal(complete_cross_attention(x, rows), complete_cross_attention(x, dense))


def test_invalid_inputs_raise_with_shapes():
    query, key = projections(IMAGE)
    with pytest.raises(ValueError, match=r"\[B, H, Q, d\]"):
        AttentionRows(query[0], key, SCALE)
    with pytest.raises(ValueError, match="broadcastable"):
        AttentionRows(query, key, SCALE, torch.zeros(B, H, 5, IMAGE))
    with pytest.raises(ValueError, match="positive step"):
        AttentionRows(query, key, SCALE, columns=slice(None, None, -1))
    with pytest.raises(ValueError, match="at least one"):
        AttentionRows(query, key, SCALE, columns=slice(3, 3))
    with pytest.raises(ValueError, match=r"\[2, 24, T\]"):
        AttentionRows(query, key, SCALE).matmul(torch.zeros(B, IMAGE + 1, 5))
    with pytest.raises(ValueError, match="dtype"):
        AttentionRows(query, key, SCALE).matmul(torch.zeros(B, IMAGE, 5, dtype=torch.float64))


class AllocationTracker(TorchDispatchMode):
    """Live bytes of the tensor storages that aten ops create inside the `with` block, and their peak.

    A storage is counted when an op first returns it and uncounted when it is freed (a weak reference to the
    storage, which torch keeps alive exactly as long as the storage). Storages that existed before (the inputs)
    are never counted. Allocations internal to a kernel are not seen; those of composite ops (matmul's copies)
    are.
    """

    def __init__(self, *inputs: torch.Tensor) -> None:
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in inputs}
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _free(self, pointer: int) -> None:
        self.current -= self.live.pop(pointer)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                pointer = storage.data_ptr()
                if storage.nbytes() and pointer not in self.live and pointer not in self.known:
                    self.live[pointer] = storage.nbytes()
                    self.current += storage.nbytes()
                    weakref.finalize(storage, self._free, pointer)
        self.peak = max(self.peak, self.current)
        return out


@pytest.mark.parametrize("completion", ["official", "power_mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows_per_chunk", [0, 3, None])  # below one row, a few rows, the whole matrix (cached)
def test_peak_extra_bytes_brackets_tracked_allocations(completion, dtype, rows_per_chunk):
    keys = IMAGE + TEXT
    query, key = projections(keys, dtype)
    bias = key_mask_bias(keys)
    row = B * keys * 4
    budget = {0: 1, 3: 3 * row, None: IMAGE * row}[rows_per_chunk]
    rows = AttentionRows(query, key, SCALE, bias, budget=budget).select(slice(0, IMAGE))
    cross = cross_probs()
    with AllocationTracker(query, key, bias, rows.bias, cross) as tracker:
        complete_cross_attention(cross, rows, completion)
    size = (B, IMAGE, keys, H, budget)
    # without the allowance for query/key copies the formula counts what always exists; with it, at most that
    exact = peak_extra_bytes(*size, tokens=cross.shape[-1], kept=IMAGE, completion=completion)
    bound = peak_extra_bytes(*size, tokens=cross.shape[-1], head_dim=D, kept=IMAGE, completion=completion)
    assert exact <= tracker.peak <= bound
    if dtype == torch.float32:
        # float32 inputs need no upcast, and where matmul copies the heads to contiguous memory (several heads of a
        # batch > 1) that happens while less else is alive: the count is exact
        assert tracker.peak == exact


def test_peak_extra_bytes_is_bounded_by_the_budget():
    batch, tokens, heads, head_dim, length = 2, 512, 12, 128, 32760  # a Wan 2.1 480p clip
    dense = batch * length * length * 4
    products = batch * length * tokens * 4
    copies = 2 * batch * (length + length) * head_dim * 4  # the query and key chunk copies, one head, n <= Q rows
    previous = 0
    for budget in (1 << 20, 1 << 24, 1 << 28, 1 << 30):
        peak = peak_extra_bytes(batch, length, length, heads, budget, tokens=tokens, head_dim=head_dim)
        # scores, softmax, head sum and running total of one chunk (each at most a budget), plus the products
        assert 3 * products <= peak <= 4 * budget + 3 * products + copies
        assert previous <= peak < dense
        previous = peak


# -- pooled queries and key columns (`SCFGConfig.mask_pool`, docs/algorithm.md section 9) ---------------------------


def _cells_by_loop(grid, factor):
    """For each cell of the pooled grid, the flat indices of the cells of `grid` it pools (row-major, frames kept)."""
    *lead, h, w = grid
    frames = int(np.prod(lead)) if lead else 1
    out = []
    for f in range(frames):
        for i in range(0, h, factor):
            for j in range(0, w, factor):
                out.append(
                    [f * h * w + y * w + x for y in range(i, min(h, i + factor)) for x in range(j, min(w, j + factor))]
                )
    return out


@pytest.mark.parametrize("grid", [(5, 7), (3, 4, 6), (2, 3, 5)])
def test_pool_cells_by_loop(grid):
    from scfg.attention import pool_cells, pooled_grid

    x = torch.randn(2, int(np.prod(grid)), 3, dtype=torch.float64)
    cells = _cells_by_loop(grid, 2)
    assert int(np.prod(pooled_grid(grid, 2))) == len(cells)
    mean = torch.stack([x[:, c].mean(1) for c in cells], 1)
    total = torch.stack([x[:, c].sum(1) for c in cells], 1)
    first = torch.stack([x[:, c[0]] for c in cells], 1)
    # at most 4 standard-normal values summed in another order (and divided by their count): a few roundings of
    # values below ~10, so within 16 eps * 4 of each other absolutely
    tol = dict(rtol=0, atol=64 * torch.finfo(torch.float64).eps)
    torch.testing.assert_close(pool_cells(x, grid, 2, dim=1, reduce="mean"), mean, **tol)
    torch.testing.assert_close(pool_cells(x, grid, 2, dim=1, reduce="sum"), total, **tol)
    assert torch.equal(pool_cells(x, grid, 2, dim=1, reduce="first"), first)


def test_pooled_rows_equal_the_softmax_of_cell_mean_queries_summed_over_key_cells():
    """`pool_queries` then `pool_columns` against float64 by hand: each pooled query is its cells' mean query, its
    head-averaged softmax over every key (a key mask included) is renormalised on the image block, and the block's
    columns are summed per cell. A per-query bias takes each cell's first query's row."""
    from scfg.attention import pooled_grid

    grid, text, heads, dim = (5, 6), 4, 3, 8
    q_len = int(np.prod(grid))
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, heads, q_len, dim, generator=g, dtype=torch.float64)
    k = torch.randn(2, heads, text + q_len, dim, generator=g, dtype=torch.float64)
    bias = torch.zeros(2, 1, 1, text + q_len, dtype=torch.float64)
    bias[1, ..., 2:text] = float("-inf")  # the second sample's text is two tokens long
    joint = AttentionRows(q, k, dim**-0.5, bias, budget=1 << 12)  # chunked: several rows at a time
    pooled = joint.pool_queries(grid, 2)
    assert pooled.shape == (2, 9, text + q_len) and pooled.query_tokens == q_len
    image = pooled.select(slice(text, None)).pool_columns(grid, 2)
    cross = pooled.select(slice(0, text))
    assert image.query_tokens == q_len and image.shape == (2, 9, 9)
    cells = _cells_by_loop(grid, 2)
    q_bar = torch.stack([q[:, :, c].mean(2) for c in cells], 2)
    probs = (q_bar @ k.transpose(-1, -2) * dim**-0.5 + bias).softmax(-1).mean(1)
    block = probs[..., text:] / probs[..., text:].sum(-1, keepdim=True)
    expected_image = torch.stack([block[..., c].sum(-1) for c in cells], -1)
    expected_cross = probs[..., :text] / probs[..., :text].sum(-1, keepdim=True)
    # float64, the same products summed in other orders (chunks, a 3-head mean, 4-cell sums): ~100 eps relative
    tol = dict(rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(image.dense(), expected_image, **tol)
    torch.testing.assert_close(cross.dense(), expected_cross, **tol)
    torch.testing.assert_close(image.dense().sum(-1), torch.ones(2, 9, dtype=torch.float64), **tol)
    x = torch.rand(2, 9, 5, dtype=torch.float64)
    torch.testing.assert_close(image.matmul(x), expected_image @ x, **tol)
    # a bias that varies along the queries: the first query of each cell gives the cell's row
    per_query = torch.randn(2, 1, q_len, text + q_len, generator=g, dtype=torch.float64)
    rows = AttentionRows(q, k, dim**-0.5, per_query).pool_queries(grid, 2)
    first = torch.tensor([c[0] for c in cells])
    expected = (q_bar @ k.transpose(-1, -2) * dim**-0.5 + per_query[:, :, first]).softmax(-1).mean(1)
    torch.testing.assert_close(rows.dense(), expected, **tol)
    assert pooled_grid(grid, 2) == (3, 3) and joint.pool_queries(grid, 1) is joint


def test_pool_columns_needs_the_grid_of_its_columns():
    q, k = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    rows = AttentionRows(q, k, 0.5)
    with pytest.raises(ValueError, match="column_pool"):
        rows.pool_columns((2, 4), 2)  # 8 cells, 6 columns
    with pytest.raises(ValueError, match="already"):
        rows.pool_columns((2, 3), 2).pool_columns((1, 2), 2)
