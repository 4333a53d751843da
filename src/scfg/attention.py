"""Head-averaged attention probabilities formed on demand, within a memory budget (docs/algorithm.md step 2a).

The completion `S' C` of step 2a only needs products `S X` with `X` `[B, Q, T]` small, so the self-attention `S`
`[B, Q, Q]` never has to exist at once: a Wan 2.1 480p clip has 32,760 tokens, and the float32 `S` of one sample is
4.3 GB.
`AttentionRows` keeps the queries and keys and forms the head-averaged softmax rows in blocks of queries of at
most `budget` bytes, each head's scores within a block in cache-sized pieces of at most `chunk` bytes.

Pure tensor code: no diffusers, no transformers, no state outside the object.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

__all__ = ["DEFAULT_BUDGET", "DEFAULT_CHUNK", "AttentionRows", "peak_extra_bytes", "pool_cells", "pooled_grid"]

# Bytes of head-averaged rows `[B, n, K]` held at once (256 MiB): the whole `[B, Q, K]` rows are formed once and
# kept for every product when they fit, otherwise formed again in blocks of rows for each product.
DEFAULT_BUDGET = 1 << 28
# Bytes of one head's scores formed at once (4 MiB): small enough that the scores, their softmax and the running
# total's block stay in the processor's cache between the three passes over them. On two CPU cores this forms a
# PixArt-Sigma 1024-px layer's pooled rows 2.3x faster than head chunks of up to 256 MiB did, as fast as the
# layer's own fused attention per score (benchmarks/RESULTS.md, "The cost of forming the rows").
DEFAULT_CHUNK = 1 << 22

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
    out_h, out_w = pooled_grid(grid, factor)[-2:]
    dim = dim % x.ndim
    rows, cols = dim + len(lead), dim + len(lead) + 1  # the grid's spatial axes, in place (no transposed copies)
    cells = x.unflatten(dim, grid)
    if reduce == "first":
        pooled = cells[(slice(None),) * rows + (slice(None, None, factor), slice(None, None, factor))]
    else:
        if (out_h * factor, out_w * factor) != (h, w):  # a partial cell at an edge: zeros added to the sums
            shape = list(cells.shape)
            shape[rows], shape[cols] = out_h * factor, out_w * factor
            padded = cells.new_zeros(shape)
            padded[(slice(None),) * rows + (slice(0, h), slice(0, w))] = cells
            cells = padded
        pooled = cells.unflatten(cols, (out_w, factor)).unflatten(rows, (out_h, factor)).sum((rows + 1, cols + 2))
        if reduce == "mean":
            counts = torch.zeros(out_h * factor, out_w * factor, dtype=x.dtype, device=x.device)
            counts[:h, :w] = 1
            counts = counts.unflatten(1, (out_w, factor)).unflatten(0, (out_h, factor)).sum((1, 3))
            pooled = pooled / counts.view(out_h, out_w, *(1,) * (x.ndim - dim - 1))
    return pooled.flatten(dim, dim + len(grid) - 1)


class AttentionRows:
    """Head-averaged attention probabilities `softmax(q kᵀ · scale + bias)` averaged over heads, `[B, Q, K]`, formed on
    demand in blocks of query rows of at most `budget` bytes, each head's scores at most `chunk` bytes at a time.

    The arithmetic: queries and keys promoted to float32 (float64 stays float64), the scale multiplied on the
    queries, the bias added to the scores, each head's softmax added into a running total in head order, which is
    divided by the number of heads at the end. Each head's scores are formed in blocks of rows of at most `chunk`
    bytes; every element is summed over its heads in the same order whatever the blocks, so `budget` and `chunk`
    change the rows only through the score matmul's own rounding for another number of rows (ulps).

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
        budget (`int`, defaults to `DEFAULT_BUDGET`): bytes of head-averaged rows `[B, rows, K]` formed at once;
            the whole rows are kept for every product when they fit (see `peak_extra_bytes`).
        chunk (`int`, *optional*): bytes of one head's scores `[B, rows, K]` formed at once (at most `budget`); a
            speed setting. Defaults to `DEFAULT_CHUNK` on the CPU, where it keeps the scores in the cache, and to
            `budget` elsewhere: on a GPU each block costs kernel launches, and the chunk's best value there has not
            been measured (no GPU was lent).
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
        chunk: int | None = None,
        column_pool: tuple[tuple[int, ...], int] | None = None,
    ) -> None:
        if query.ndim != 4 or key.ndim != 4 or query.shape[:2] != key.shape[:2] or query.shape[3] != key.shape[3]:
            raise ValueError(
                f"Expected `query` [B, H, Q, d] and `key` [B, H, K, d] with the same B, H and d, but got "
                f"{tuple(query.shape)} and {tuple(key.shape)}."
            )
        if chunk is None:
            chunk = DEFAULT_CHUNK if query.device.type == "cpu" else budget
        if int(budget) < 1 or int(chunk) < 1:
            raise ValueError(f"Expected a positive `budget` and `chunk` in bytes, but got {budget} and {chunk}.")
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
        self.columns, self.renormalise, self.budget, self.chunk = columns, bool(renormalise), int(budget), int(chunk)
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
        # a block holds as many head-averaged rows as fit in the budget, and at least one row
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
            chunk=self.chunk,
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
            chunk=self.chunk,
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
            chunk=self.chunk,
            column_pool=(tuple(grid), factor),
        )
        pooled._shared = self._shared
        pooled.query_tokens = self.query_tokens
        return pooled

    def _head_average(self, start: int, stop: int) -> torch.Tensor:
        """Full head-averaged rows `start:stop`, `[B, n, K]`: one head at a time, its scores in blocks of rows of
        at most `chunk` bytes (`min(chunk, budget)`), each block's softmax added into a running total. Every element
        is the sum of its heads in head order whatever the blocks, so the result does not depend on the budget."""
        batch, heads, n = self.shape[0], self._heads, stop - start
        step = max(1, min(n, min(self.chunk, self.budget) // self._row_bytes))
        total = torch.zeros(batch, n, self._num_keys, dtype=self.dtype, device=self.device)
        for head in range(heads):
            self._add_head(total, head, start, stop, step)
        return total.div_(heads)

    def _add_head(self, total: torch.Tensor, head: int, start: int, stop: int, step: int) -> None:
        """Add one head's softmax rows `start:stop` into `total`, `step` rows at a time. A function of its own so
        that this head's keys are freed before the next head's exist."""
        # `[B, d, K]`: a view for float32 keys (bmm reads the processor's strided layout as it is), one upcast copy
        # per head, not per block, for half-precision keys
        key = self.key[:, head].to(self.dtype).transpose(-1, -2)
        for begin in range(start, stop, step):
            end = min(stop, begin + step)
            total[:, begin - start : end - start] += self._softmax(key, head, begin, end)

    def _softmax(self, key: torch.Tensor, head: int, start: int, stop: int) -> torch.Tensor:
        """Softmax rows `start:stop` of one head, `[B, n, K]`, for that head's keys `key` `[B, d, K]`. A function of
        its own so that the scores are freed as soon as their softmax exists."""
        # the scale goes on the (smaller) queries; the scores are then touched in place only
        scores = torch.matmul(self.query[:, head, start:stop].to(self.dtype) * self.scale, key)
        if self.bias is not None:
            heads = head if self.bias.shape[1] > 1 else 0
            queries = slice(start, stop) if self.bias.shape[2] > 1 else slice(None)
            scores += self.bias[:, heads, queries]
        return scores.softmax(dim=-1)

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
    kept: int | None = None,
    chunk: int = DEFAULT_CHUNK,
    completion: Literal["official", "power_mean"] = "official",
) -> int:
    """Return the peak extra memory in bytes of `complete_cross_attention(cross_probs, rows, completion)` for
    `rows = AttentionRows(query, key, scale, budget=budget, chunk=chunk)` of that size, or for
    `rows.select(columns)` of `kept` columns (renormalised).

    Counts the tensors the completion creates beyond its inputs (queries, keys, bias, `cross_probs`), as
    `AttentionRows` and `complete_cross_attention` are written. With `r = B K elem` the bytes of one row:

    - the rows are formed in blocks of `n = min(Q, budget // r)` rows (at least 1): all `Q` when they fit, and then
      they are formed once and kept (with the renormalised block of `kept` columns beside them) for every product;
      otherwise each product forms them again, block by block;
    - a block is a running total `n r` plus one head's scores of `m = min(n, min(chunk, budget) // r)` rows (at
      least 1) and their softmax, `2 m r`, or, while the scores are formed, the scores and the scaled query rows
      `B m d elem`; half-precision inputs add an upcast copy of one head's keys and of the query rows;
    - the renormalised block is formed beside its block of full rows, with their row sums;
    - the `[B, Q, T]` products alive at once: 2 during a product formed block by block for `"official"` (`S C` and
      the product being filled) and 3 for `"power_mean"` (total, power, the next power), 3 in either's additions.

    With `head_dim=0` the query rows and copies are left out and the count is exact for float32 inputs whenever
    `d <= K` (the softmax, not the scores' forming, is then the larger); with `head_dim=d` it is an upper bound for
    any input layout and dtype. The size of `S` itself (`B Q K elem`) is what this bounds away: for a Wan 2.1 480p
    clip (B = 2, Q = K = 32,760, 12 heads of 128, T = 512) the peak is about 0.58 GB with the default 256 MiB budget
    and 0.40 GB with 64 MiB (most of it the three products), against 8.6 GB for `S`.

    Args:
        batch, queries, keys, heads: `B`, `Q`, `K`, `H` of the self-attention.
        budget (`int`): the `AttentionRows` budget in bytes.
        elem (`int`, defaults to `4`): bytes per element of the compute dtype (float32; 8 for float64).
        tokens (`int`, defaults to `0`): `T`, the text tokens of `cross_probs`; 0 leaves the products out.
        head_dim (`int`, defaults to `0`): `d`; 0 leaves the query rows and copies out.
        kept (`int`, *optional*): the columns of a renormalised `select`; `None` for the whole rows.
        chunk (`int`, defaults to `DEFAULT_CHUNK`): the `AttentionRows` chunk in bytes (its CPU default; on a GPU the
            default chunk is the budget).
        completion (`str`, defaults to `"official"`): `"official"` or `"power_mean"`.

    >>> round(peak_extra_bytes(2, 32760, 32760, 12, 1 << 26, tokens=512, head_dim=128) / 1e9, 2)
    0.4
    """
    if completion not in ("official", "power_mean"):
        raise ValueError(f"Expected `completion` 'official' or 'power_mean', but got {completion!r}.")
    row = batch * keys * elem
    product = batch * queries * tokens * elem
    cached = queries * row <= budget
    n = queries if cached else max(1, budget // row)
    m = min(n, max(1, min(chunk, budget) // row))
    rows, scores = n * row, m * row
    query_rows = batch * m * head_dim * elem
    copies = batch * keys * head_dim * elem + query_rows if head_dim else 0  # half-precision upcasts, at most
    forming = rows + copies + max(2 * scores, scores + query_rows)
    block = 0 if kept is None else batch * n * kept * elem  # the renormalised block beside its full rows
    keeping = rows + block + (batch * n * elem if kept is not None else 0)  # ... and the row sums, while formed
    if cached:
        return max(forming, keeping, rows + block + 3 * product)
    alive = 3 if completion == "power_mean" else 2
    # a chunked product's block: its full rows (freed once kept), its kept block, and that block's product
    multiplying = (block if kept is not None else rows) + batch * n * tokens * elem
    return max(alive * product + max(forming, keeping, multiplying), 3 * product)
