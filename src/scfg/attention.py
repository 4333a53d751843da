"""Head-averaged attention probabilities formed on demand, within a memory budget (docs/algorithm.md step 2a).

The completion `S' C` of step 2a only needs products `S X` with `X` `[B, Q, T]` small, so the self-attention `S`
`[B, Q, Q]` never has to exist at once: a Wan 2.1 480p clip has 32,760 tokens, and the float32 `S` of one sample is
4.3 GB.
`AttentionRows` keeps the queries and keys and forms the head-averaged softmax rows in query chunks, heads in chunks
within each, so that no more than `budget` bytes of scores exist at once.

Pure tensor code: no diffusers, no transformers, no state outside the object.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_BUDGET", "AttentionRows", "peak_extra_bytes", "pool_cells", "pooled_grid"]

# Bytes of scores formed at once: 2**26 float32 elements, the head chunk `capture.head_averaged_softmax` has always
# used, so that with this budget the head chunks, hence the sums, are the same as there.
DEFAULT_BUDGET = 1 << 28

_RENORM_EPS = 1e-12


def pooled_grid(grid: Sequence[int], factor: int) -> tuple[int, ...]:
    """The grid whose cells pool `factor x factor` cells of `grid`'s last two (spatial) axes, ceil-divided (a
    partial cell at the right or bottom edge is a cell); leading axes (frames) are kept.

    >>> pooled_grid((3, 17, 23), 2)
    (3, 9, 12)
    """
    *lead, h, w = (int(n) for n in grid)
    return (*lead, -(-h // factor), -(-w // factor))


def pool_cells(
    x: torch.Tensor, grid: Sequence[int], factor: int, dim: int, reduce: Literal["mean", "sum", "first"]
) -> torch.Tensor:
    """Pool axis `dim` of `x`, which holds the `prod(grid)` cells of `grid` in row-major order, into the cells of
    `pooled_grid(grid, factor)`: their mean, their sum, or the first (top-left) cell of each. Edge cells pool what
    they have (a mean over the cells present)."""
    grid = tuple(int(n) for n in grid)
    if x.shape[dim] != math.prod(grid):
        raise ValueError(f"Expected {math.prod(grid)} cells of the grid {grid} on axis {dim}, but got {x.shape[dim]}.")
    *lead, h, w = grid
    out_grid = pooled_grid(grid, factor)
    moved = x.movedim(dim, -1)
    cells = moved.reshape(*moved.shape[:-1], *lead, h, w)
    if reduce == "first":
        pooled = cells[..., ::factor, ::factor]
    else:
        pad_h, pad_w = out_grid[-2] * factor - h, out_grid[-1] * factor - w
        padded = F.pad(cells, (0, pad_w, 0, pad_h))
        pooled = padded.unflatten(-1, (out_grid[-1], factor)).unflatten(-3, (out_grid[-2], factor)).sum((-3, -1))
        if reduce == "mean":
            counts = F.pad(torch.ones(h, w, dtype=x.dtype, device=x.device), (0, pad_w, 0, pad_h))
            pooled = pooled / counts.unflatten(-1, (out_grid[-1], factor)).unflatten(0, (out_grid[-2], factor)).sum(
                (1, 3)
            )
    return pooled.flatten(-len(grid)).movedim(-1, dim)


class AttentionRows:
    """Head-averaged attention probabilities `softmax(q kᵀ · scale + bias)` averaged over heads, `[B, Q, K]`, formed on
    demand in query chunks so that no more than `budget` bytes of scores exist at once.

    The arithmetic is that of `capture.head_averaged_softmax`: queries and keys promoted to float32 (float64 stays
    float64), the scale multiplied on the queries, the bias added to the scores, the softmax of each head chunk
    summed over its heads into a running total, which is divided by the number of heads at the end. Without
    `columns`, `dense()` is bit for bit that function's result (with the same bias) whenever both form the same
    chunks: with the default budget, for float32 and one head's scores of all queries within it (`B Q K <= 2**26`).

    Args:
        query (`torch.Tensor`): `[B, H, Q, d]` queries (heads split, q-norm and rotary embedding applied).
        key (`torch.Tensor`): `[B, H, K, d]` keys.
        scale (`float`): the softmax scale, usually `d ** -0.5`.
        bias (`torch.Tensor`, *optional*): broadcastable to `[B, H, Q, K]`, added to the scores (e.g. `-inf` or
            `-10000` for masked keys); converted once to the compute dtype.
        columns (`slice`, *optional*): keep only these key columns of the head-averaged rows; all when `None`.
        renormalise (`bool`, defaults to `False`): divide each kept row by its sum (clamped below at 1e-12). For
            joint attention (MMDiT), where one softmax runs over `[image; text]` keys and the image block and the
            text block are read separately.
        budget (`int`, defaults to `DEFAULT_BUDGET`): bytes of scores `[B, heads, rows, K]` formed at once; their
            softmax transiently takes as much again (see `peak_extra_bytes`).
        column_pool (`(grid, factor)`, *optional*): the kept columns are the cells of `grid` (the image keys of a
            self-attention block); sum them into the cells of `pooled_grid(grid, factor)` after any renormalisation,
            so each row gives the probability of attending to each pooled cell (`pool_columns`).

    >>> q = torch.randn(2, 3, 5, 4); k = torch.randn(2, 3, 5, 4)
    >>> rows = AttentionRows(q, k, 0.5, budget=64)
    >>> rows.shape, torch.allclose(rows.dense().sum(-1), torch.ones(2, 5))
    ((2, 5, 5), True)
    >>> x = torch.rand(2, 5, 7)
    >>> torch.allclose(rows.matmul(x), rows.dense() @ x, atol=1e-6)
    True
    """

    def __init__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        scale: float,
        bias: torch.Tensor | None = None,
        *,
        columns: slice | None = None,
        renormalise: bool = False,
        budget: int = DEFAULT_BUDGET,
        column_pool: tuple[tuple[int, ...], int] | None = None,
    ) -> None:
        if query.ndim != 4 or key.ndim != 4 or query.shape[:2] != key.shape[:2] or query.shape[3] != key.shape[3]:
            raise ValueError(
                f"Expected `query` [B, H, Q, d] and `key` [B, H, K, d] with the same B, H and d, but got "
                f"{tuple(query.shape)} and {tuple(key.shape)}."
            )
        if int(budget) < 1:
            raise ValueError(f"Expected a positive `budget` in bytes, but got {budget}.")
        batch, heads, num_queries, _ = query.shape
        num_keys = key.shape[2]
        self.dtype = torch.promote_types(query.dtype, torch.float32)
        self.device = query.device
        if bias is not None:
            full = (batch, heads, num_queries, num_keys)
            try:
                broadcast = torch.broadcast_shapes(bias.shape, full)
            except RuntimeError:
                broadcast = None
            if broadcast != full:
                raise ValueError(f"Expected a `bias` broadcastable to {list(full)}, but got {list(bias.shape)}.")
            bias = bias.to(self.dtype)[(None,) * (4 - bias.ndim)]  # leading axes of 1, so it slices as 4-D
        if columns is not None and columns.step is not None and columns.step < 1:
            raise ValueError(f"Expected `columns` with a positive step, but got {columns}.")
        kept = len(range(num_keys)[columns]) if columns is not None else num_keys
        if kept == 0:
            raise ValueError(f"Expected `columns` that keep at least one of the {num_keys} keys, but got {columns}.")
        if column_pool is not None:
            pool_grid, factor = tuple(int(n) for n in column_pool[0]), int(column_pool[1])
            if math.prod(pool_grid) != kept or factor < 1:
                raise ValueError(
                    f"Expected `column_pool` over the {kept} kept columns and a factor >= 1, but got {column_pool}."
                )
            column_pool = (pool_grid, factor)
            kept = math.prod(pooled_grid(pool_grid, factor))
        self.query, self.key, self.scale, self.bias = query, key, float(scale), bias
        self.columns, self.renormalise, self.budget = columns, bool(renormalise), int(budget)
        self.column_pool = column_pool
        self.shape = (batch, num_queries, kept)
        # the query tokens these rows stand for: Q, or the full grid's count for the pooled queries of
        # `pool_queries` (joint attention's image-key block is as long as this, not as the pooled rows)
        self.query_tokens = num_queries
        self._heads, self._num_keys = heads, num_keys
        self._dense: torch.Tensor | None = None
        # the full head-averaged rows, formed once for this object and every `select` of it when they fit the
        # budget: joint attention reads two column blocks (text, image) of the same softmax
        self._shared: dict[str, torch.Tensor] = {}

    @property
    def _row_bytes(self) -> int:
        """Bytes of one query row of one head's scores, for the whole batch."""
        return self.shape[0] * self._num_keys * self.dtype.itemsize

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Return rows `start:stop`, `[B, stop - start, K_kept]`, formed in chunks within the budget."""
        if not 0 <= start <= stop <= self.shape[1]:
            raise ValueError(f"Expected 0 <= start <= stop <= {self.shape[1]}, but got {start} and {stop}.")
        # a chunk holds as many rows as one head's scores fit in the budget, and at least one row
        step = max(1, self.budget // self._row_bytes)
        if stop - start <= step:
            if (start, stop) == (0, self.shape[1]):  # all rows at once: formed once, shared with the selections
                full = self._shared.get("full")
                if full is None:
                    full = self._shared["full"] = self._head_average(start, stop)
                return self._keep(full)
            return self._keep(self._head_average(start, stop))
        out = torch.empty(self.shape[0], stop - start, self.shape[2], dtype=self.dtype, device=self.device)
        for begin in range(start, stop, step):
            end = min(stop, begin + step)
            out[:, begin - start : end - start] = self._keep(self._head_average(begin, end))
        return out

    def dense(self) -> torch.Tensor:
        """Return all rows, `[B, Q, K_kept]` (the tensor `matmul` caches, if it has; do not modify it in place)."""
        if self._dense is not None:
            return self._dense
        return self.rows(0, self.shape[1])

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """Return `self @ x`, `[B, Q, T]`, for `x` `[B, K_kept, T]` in this object's dtype.

        When the full rows `[B, Q, K]` fit in the budget they are formed once and cached (the completion multiplies
        by the same matrix several times); otherwise each product forms the rows again, one chunk at a time.
        """
        batch, num_queries, kept = self.shape
        if x.ndim != 3 or x.shape[0] != batch or x.shape[1] != kept:
            raise ValueError(f"Expected `x` of shape [{batch}, {kept}, T], but got {list(x.shape)}.")
        if x.dtype != self.dtype:
            raise ValueError(f"Expected `x` in {self.dtype}, the dtype of the probabilities, but got {x.dtype}.")
        if self._dense is None and num_queries * self._row_bytes <= self.budget:
            self._dense = self.dense()
        if self._dense is not None:
            return torch.bmm(self._dense, x)
        step = max(1, self.budget // self._row_bytes)
        out = torch.empty(batch, num_queries, x.shape[2], dtype=self.dtype, device=self.device)
        for start in range(0, num_queries, step):
            stop = min(num_queries, start + step)
            out[:, start:stop] = torch.bmm(self.rows(start, stop), x)
        return out

    def select(self, columns: slice, renormalise: bool = True) -> AttentionRows:
        """Return the same queries and keys with another block of key `columns` (indices of all `K` keys); the full
        rows, when they fit the budget, are formed once for both."""
        selected = AttentionRows(
            self.query,
            self.key,
            self.scale,
            self.bias,
            columns=columns,
            renormalise=renormalise,
            budget=self.budget,
        )
        selected._shared = self._shared  # the same object's private state: one softmax for every block read
        selected.query_tokens = self.query_tokens
        return selected

    def pool_queries(self, grid: Sequence[int], factor: int) -> AttentionRows:
        """Return the rows of pooled queries: the queries are the cells of `grid` (`prod(grid) == Q`), and each cell
        of `pooled_grid(grid, factor)` gets the mean of its `factor x factor` queries (after their norms and rotary
        embedding), so forming its row costs `1 / factor²` of the full rows (docs/algorithm.md section 9). A bias
        that varies along the queries takes each cell's first query's row (exact for key masks broadcast over the
        queries). Nothing is formed yet; the new object shares no rows with this one."""
        if factor == 1:
            return self
        bias = self.bias
        if bias is not None and bias.shape[2] > 1:
            bias = pool_cells(bias, grid, factor, dim=2, reduce="first")
        pooled = AttentionRows(
            pool_cells(self.query, grid, factor, dim=2, reduce="mean"),
            self.key,
            self.scale,
            bias,
            columns=self.columns,
            renormalise=self.renormalise,
            budget=self.budget,
            column_pool=self.column_pool,
        )
        pooled.query_tokens = self.query_tokens
        return pooled

    def pool_columns(self, grid: Sequence[int], factor: int) -> AttentionRows:
        """Return these rows with their kept columns, the cells of `grid`, summed into the cells of
        `pooled_grid(grid, factor)` (a self-attention block over the image keys, made square on the pooled grid
        of `pool_queries`). Shares the full rows with this object."""
        if factor == 1:
            return self
        if self.column_pool is not None:
            raise ValueError("Expected rows whose columns are not pooled yet, but these already are.")
        pooled = AttentionRows(
            self.query,
            self.key,
            self.scale,
            self.bias,
            columns=self.columns,
            renormalise=self.renormalise,
            budget=self.budget,
            column_pool=(tuple(grid), factor),
        )
        pooled._shared = self._shared
        pooled.query_tokens = self.query_tokens
        return pooled

    def _head_average(self, start: int, stop: int) -> torch.Tensor:
        """Full head-averaged rows `start:stop`, `[B, n, K]`, heads in chunks whose scores fit in the budget."""
        batch, heads = self.shape[0], self._heads
        step = max(1, self.budget // max(1, (stop - start) * self._row_bytes))
        total = torch.zeros(batch, stop - start, self._num_keys, dtype=self.dtype, device=self.device)
        for first in range(0, heads, step):
            total += self._head_sum(first, min(heads, first + step), start, stop)
        return total / heads

    def _head_sum(self, first: int, last: int, start: int, stop: int) -> torch.Tensor:
        """Softmax rows `start:stop` of heads `first:last`, summed over those heads, `[B, n, K]`. A function of its
        own so that the scores are freed before the next chunk's exist."""
        query = self.query[:, first:last, start:stop]
        key = self.key[:, first:last]
        # the scale goes on the (smaller) queries; the scores are then touched in place only
        scores = torch.matmul(query.to(self.dtype) * self.scale, key.to(self.dtype).transpose(-1, -2))
        if self.bias is not None:
            heads = slice(first, last) if self.bias.shape[1] > 1 else slice(None)
            queries = slice(start, stop) if self.bias.shape[2] > 1 else slice(None)
            scores += self.bias[:, heads, queries]
        return scores.softmax(dim=-1).sum(dim=1)

    def _keep(self, rows: torch.Tensor) -> torch.Tensor:
        """The kept columns of full rows, renormalised if asked."""
        if self.columns is not None:
            rows = rows[..., self.columns]
        if self.renormalise:
            rows = rows / rows.sum(dim=-1, keepdim=True).clamp_min(_RENORM_EPS)
        if self.column_pool is not None:
            return pool_cells(rows, self.column_pool[0], self.column_pool[1], dim=-1, reduce="sum")
        # a copy of the kept block only, so that the full rows can be freed
        return rows if self.renormalise else rows.contiguous()


def peak_extra_bytes(
    batch: int,
    queries: int,
    keys: int,
    heads: int,
    budget: int,
    elem: int = 4,
    *,
    tokens: int = 0,
    head_dim: int = 0,
    completion: Literal["official", "power_mean"] = "official",
) -> int:
    """Return the peak extra memory in bytes of `complete_cross_attention(cross_probs, rows, completion)` for
    `rows = AttentionRows(query, key, scale, budget=budget)` of that size.

    Counts the tensors the completion creates beyond its inputs (queries, keys, bias, `cross_probs`), as
    `AttentionRows` and `complete_cross_attention` are written:

    - one chunk of `n = min(Q, budget // (B K elem))` rows (at least 1) and `h` heads (as many as the budget holds;
      always 1 when `n < Q`), of `A = B n K elem` bytes per head: the running head total, the scores, their softmax
      and its sum over heads, `(2 h + 2) A`; while the scores are formed, the total, the scores and copies of the
      query and key chunks in the compute dtype (an upcast of half-precision inputs and matmul's contiguous copy,
      each at most), `(h + 1) A + 2 B h (n + K) d elem`;
    - the `[B, Q, T]` products alive at once: 2 during a chunked product for `"official"` (`S C` and the product
      being filled) and 3 for `"power_mean"` (total, power, the next power), 3 in either's additions;
    - when the full rows fit in the budget (`B Q K elem <= budget`) they are formed once, before any product exists,
      and cached: the chunk is then all `Q` rows, and it stays while the 3 products live.

    With `head_dim=0` the copies are left out and the count is exact (for float32 inputs sliced from a processor's
    `[B, L, H d]` layout no copy is made at the peak); with `head_dim=d` it is an upper bound for any input layout
    and dtype. The size of `S` itself (`B Q K elem`) is what this bounds away: for a Wan 2.1 480p clip (B = 2,
    Q = K = 32,760, 12 heads of 128, T = 512) the peak is about 1.3 GB with the default 256 MiB budget and 0.54 GB
    with 64 MiB, against 8.6 GB for `S`.

    Args:
        batch, queries, keys, heads: `B`, `Q`, `K`, `H` of the self-attention.
        budget (`int`): the `AttentionRows` budget in bytes.
        elem (`int`, defaults to `4`): bytes per element of the compute dtype (float32; 8 for float64).
        tokens (`int`, defaults to `0`): `T`, the text tokens of `cross_probs`; 0 leaves the products out.
        head_dim (`int`, defaults to `0`): `d`; 0 leaves the query and key copies out.
        completion (`str`, defaults to `"official"`): `"official"` or `"power_mean"`.

    >>> round(peak_extra_bytes(2, 32760, 32760, 12, 1 << 26, tokens=512, head_dim=128) / 1e9, 2)
    0.54
    """
    if completion not in ("official", "power_mean"):
        raise ValueError(f"Expected `completion` 'official' or 'power_mean', but got {completion!r}.")
    per_row = batch * keys * elem
    product = batch * queries * tokens * elem
    cached = queries * per_row <= budget
    n = queries if cached else max(1, budget // per_row)
    h = min(heads, max(1, budget // (n * per_row)))
    chunk = n * per_row
    work = max(
        (2 * h + 2) * chunk,  # total, scores, softmax, its head sum
        (h + 1) * chunk + 2 * batch * h * (n + keys) * head_dim * elem,  # total, scores, query and key copies
        chunk + batch * n * tokens * elem,  # the kept block and its product
    )
    if cached:
        return max(work, chunk + 3 * product)
    alive = 3 if completion == "power_mean" else 2
    return max(alive * product + work, 3 * product)
