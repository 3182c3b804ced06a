"""Exact k-nearest neighbours, in one process (`knn`) or spread over processes (`ShardedSearch`).

A neighbour list is *defined* by exact arithmetic on the inputs: the ``k``
references with the smallest distance recomputed from coordinate differences,
ties broken by the lower reference index. The fast part of the search (matrix
products of the ``||q||^2 + ||r||^2 - 2 q.r`` expansion, in blocks) only
proposes candidates: twice ``k`` of them, re-ranked by their exact distances
and kept only when a rounding-error bound shows that no reference outside them
can come closer (else the row is searched again with more candidates). The
lists therefore do not depend on how queries and references are blocked or
dealt to processes, nor on which BLAS or device runs the products: a search
spread over several processes (or GPUs, or nodes) returns bit for bit what one
process does, ties included.

Plain torch; ``torch.distributed`` only in `ShardedSearch`, through an explicit
rank, world size and group, so it runs (and is tested) without Lightning.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

__all__ = ["Metric", "NeighbourSearch", "ShardedSearch", "float_matrix", "knn", "merge_neighbours"]

Metric = Literal["euclidean", "cosine"]


class NeighbourSearch(Protocol):
    """What `lit_amdet.outliers.score_samples` calls for its neighbour lists instead of `knn`.

    Called with `knn`'s arguments by every process taking part; returns the lists on the process whose
    ``is_root`` is true and None on the others (they only lend their share of the work).
    """

    is_root: bool

    def __call__(self, queries: Tensor, references: Tensor | None = None, *, k: int, chunk_size: int = 1024,
                 metric: Metric = "euclidean", ref_chunk_size: int | None = None,
                 self_index: Tensor | None = None) -> tuple[Tensor, Tensor] | None: ...


# ---------------------------------------------------------------------------
# one process
# ---------------------------------------------------------------------------


def float_matrix(x: Tensor) -> Tensor:
    """``x`` as a float32/float64 ``[N, D]`` matrix (ValueError otherwise)."""
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D [N, D] tensor, got shape {tuple(x.shape)}")
    # Half precision loses too much in ||q||^2 + ||r||^2 - 2 q.r.
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _smallest_k(d: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Row-wise ``k`` smallest values of ``d`` with ties broken by lowest column.

    Returns ``(values, columns)`` ordered by ``(value, column)``. ``torch.topk``
    alone breaks ties arbitrarily; rows whose ``k``-th value is tied are
    re-selected explicitly, so the candidates are reproducible.
    """
    vals, cols = torch.topk(d, k, dim=1, largest=False, sorted=True)
    kth = vals[:, -1:]
    tied = (d <= kth).sum(dim=1) > k
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        dt, kt = d[rows], kth[rows]
        # Key: strictly-smaller entries first (-1), then tied ones by column,
        # everything else last; the k smallest keys are the canonical choice.
        pos = torch.arange(d.shape[1], device=d.device, dtype=torch.int64)
        key = torch.where(dt == kt, pos, torch.iinfo(torch.int64).max)
        key = torch.where(dt < kt, -1, key)
        sel = torch.topk(key, k, dim=1, largest=False).indices
        vals[rows] = dt.gather(1, sel)
        cols[rows] = sel
    return _sort_by_value_then_index(vals, cols)


def _sort_by_value_then_index(vals: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    order = idx.argsort(dim=1)
    vals, idx = vals.gather(1, order), idx.gather(1, order)
    order = vals.argsort(dim=1, stable=True)
    return vals.gather(1, order), idx.gather(1, order)


def merge_neighbours(distances: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` best of several partial lists laid side by side (``[N, m]``, m >= k): by distance, then index.

    Exact for partial lists of disjoint reference sets, each the ``k`` best of its own set: the best ``k``
    overall are among them, in the same total order.
    """
    d, i = _sort_by_value_then_index(distances, indices)
    return d[:, :k].contiguous(), i[:, :k].contiguous()


@contextmanager
def _full_precision_products() -> Iterator[None]:
    # The candidate check bounds the rounding of full float32 products; TF32 or bf16 passes would break it.
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _checked(queries: Tensor, references: Tensor | None, k: int, chunk_size: int, metric: str,
             exclude_self: bool, ref_chunk_size: int | None,
             self_index: Tensor | None) -> tuple[Tensor, Tensor, bool, Tensor | None]:
    """`knn`'s arguments checked (ValueError): ``(queries, references, self_mode, self_index)`` as floats."""
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"unknown metric {metric!r}")
    if chunk_size < 1 or (ref_chunk_size is not None and ref_chunk_size < 1):
        raise ValueError("chunk sizes must be positive")
    q_all = float_matrix(queries)
    self_mode = references is None or references is queries
    r_all = q_all if self_mode else float_matrix(references)  # type: ignore[arg-type]
    if r_all.shape[1] != q_all.shape[1]:
        raise ValueError("queries and references must have the same dimension")
    if r_all.dtype != q_all.dtype:
        r_all = r_all.to(q_all.dtype)
    n_q, n_r = q_all.shape[0], r_all.shape[0]
    if self_index is not None:
        if self_mode:
            raise ValueError("self_index goes with a separate references set")
        self_index = self_index.to(device=q_all.device, dtype=torch.int64)
        if self_index.shape != (n_q,) or bool((self_index >= n_r).any()) or bool((self_index < -1).any()):
            raise ValueError(f"self_index must hold one reference row (or -1) for each of the {n_q} queries")
    skip_self = self_mode and exclude_self
    available = n_r - 1 if skip_self or (self_index is not None and bool((self_index >= 0).any())) else n_r
    if not 1 <= k <= available:
        raise ValueError(f"k={k} must be in [1, {available}] for {n_r} reference points")
    own = torch.arange(n_q, device=q_all.device) if skip_self else self_index
    return q_all, r_all, self_mode, own


@torch.no_grad()
def knn(
    queries: Tensor,
    references: Tensor | None = None,
    k: int = 16,
    chunk_size: int = 1024,
    metric: Metric = "euclidean",
    exclude_self: bool = True,
    ref_chunk_size: int | None = None,
    self_index: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact k-nearest neighbours by chunked matrix products.

    Args:
        queries: ``[N, D]`` points whose neighbours are searched.
        references: ``[M, D]`` reference set; ``None`` (or ``queries`` itself)
            means the queries are the reference set.
        k: number of neighbours.
        chunk_size: number of query rows processed at once.
        metric: ``"euclidean"`` (L2 distance) or ``"cosine"`` (``1 - cos``).
        exclude_self: when the queries are the reference set, drop each point
            from its own neighbour list. Exclusion is by index identity, so
            exact duplicates of *other* points remain neighbours at distance 0.
            Ignored when a distinct ``references`` set is given.
        ref_chunk_size: number of reference rows scored at once (``None``:
            enough for a block of about 64 M distances, 256 MB in float32);
            partial candidate lists are merged across reference chunks.
        self_index: with a separate ``references`` set that holds some of
            the queries: for each query, its own row in ``references``, or -1
            (``[N]`` integers). Those rows are excluded as in a self-search:
            a shard of the set searched against all of it, or the set scored
            against a subsample of itself.

    Returns:
        ``(distances [N, k], indices [N, k])``: the references with the
        smallest exact distance (from coordinate differences, so exact
        duplicates come out at exactly 0), sorted by distance, ties broken by
        lowest reference index; independent of the chunk sizes (module doc).

    Peak extra memory is about ``chunk_size * R * (itemsize + 1)`` bytes with
    ``R`` the reference chunk, plus up to ``8 + itemsize`` bytes per element
    for rows with ties among the candidates, plus an ``[M, D]`` normalised copy
    for the cosine metric. Runs on whatever device the inputs live on; float32
    products run at full precision whatever ``torch.set_float32_matmul_precision``
    says.
    """
    q_all, r_all, self_mode, own_all = _checked(queries, references, k, chunk_size, metric, exclude_self,
                                                ref_chunk_size, self_index)
    n_q, n_r = q_all.shape[0], r_all.shape[0]
    out_d = torch.empty(n_q, k, dtype=q_all.dtype, device=q_all.device)
    out_i = torch.empty(n_q, k, dtype=torch.int64, device=q_all.device)
    if n_q == 0:
        return out_d, out_i
    if metric == "cosine":
        q_all = _unit_rows(q_all)
        r_all = q_all if self_mode else _unit_rows(r_all)
        r_sq, r_norm = None, 1.0
    else:
        r_sq = r_all.pow(2).sum(dim=1)
        r_norm = float(r_sq.max().sqrt())
    # Blocks of ~64 M distances: big enough for full-speed matrix products, small enough to bound memory.
    r_step = ref_chunk_size if ref_chunk_size is not None else max(k, 2**26 // min(chunk_size, n_q))
    with _full_precision_products():
        for qs in range(0, n_q, chunk_size):
            rows = torch.arange(qs, min(qs + chunk_size, n_q), device=q_all.device)
            width = min(n_r, 2 * k)  # candidates per query
            while rows.numel():
                q = q_all[rows]
                own = own_all[rows] if own_all is not None else None
                approx, cand = _candidates(q, own, r_all, r_sq, width, r_step)
                dist, idx = _exact(q, own, r_all, cand, metric)
                done = _certain(approx[:, -1], dist[:, k - 1], q, r_norm, metric)
                if width == n_r:  # every reference was a candidate
                    done.fill_(True)
                out_d[rows[done]], out_i[rows[done]] = dist[done, :k], idx[done, :k]
                rows, width = rows[~done], min(n_r, 4 * width)
    return out_d, out_i


def _candidates(q: Tensor, own: Tensor | None, r_all: Tensor, r_sq: Tensor | None, width: int,
                r_step: int) -> tuple[Tensor, Tensor]:
    """The ``width`` smallest expansion values of each query row over all references, with their columns."""
    q_sq = q.pow(2).sum(dim=1, keepdim=True) if r_sq is not None else None
    best_d: Tensor | None = None
    best_i: Tensor | None = None
    for rs in range(0, r_all.shape[0], r_step):
        re_ = min(rs + r_step, r_all.shape[0])
        r = r_all[rs:re_]
        if r_sq is not None and q_sq is not None:  # squared L2 (monotone in L2, so enough for selection)
            d = torch.addmm(r_sq[rs:re_].unsqueeze(0), q, r.T, alpha=-2.0)
            d.add_(q_sq).clamp_(min=0.0)
        else:
            d = torch.mm(q, r.T).neg_().add_(1.0).clamp_(0.0, 2.0)
        if own is not None:
            hit = ((own >= rs) & (own < re_)).nonzero().squeeze(1)
            d[hit, own[hit] - rs] = float("inf")
        cd, ci = _smallest_k(d, min(width, re_ - rs))
        ci = ci + rs
        del d
        if best_d is None or best_i is None:
            best_d, best_i = cd, ci
        else:
            # Earlier chunks hold lower indices, so column order in the concatenation keeps the index tie-break.
            md, mc = _smallest_k(torch.cat([best_d, cd], dim=1), min(width, best_d.shape[1] + cd.shape[1]))
            best_i = torch.cat([best_i, ci], dim=1).gather(1, mc)
            best_d = md
    assert best_d is not None and best_i is not None
    return best_d, best_i


def _exact(q: Tensor, own: Tensor | None, r_all: Tensor, cand: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """Exact distances of the candidates from coordinate differences, sorted by (distance, index).

    Each distance is summed over one pair's coordinates in a fixed order (`_sum_last`), so it is the same bits
    whichever rows share the batch, on any device; a query's own row (a candidate only when every reference
    is) comes out at infinity.
    """
    cols = max(1, min(cand.shape[1], 2**25 // q.shape[1]))  # blocks of ~32 M differences (128 MB in float32)
    rows = max(1, 2**25 // (cols * q.shape[1]))
    sq = torch.empty(cand.shape, dtype=q.dtype, device=q.device)
    for s in range(0, q.shape[0], rows):
        for c in range(0, cand.shape[1], cols):
            diff = q[s:s + rows].unsqueeze(1) - r_all[cand[s:s + rows, c:c + cols]]
            sq[s:s + rows, c:c + cols] = _sum_last(diff.mul_(diff))
    dist = sq.sqrt_() if metric == "euclidean" else sq.mul_(0.5)
    if own is not None:
        dist.masked_fill_((cand == own.unsqueeze(1)) & (own.unsqueeze(1) >= 0), float("inf"))
    return _sort_by_value_then_index(dist, cand)


def _sum_last(t: Tensor) -> Tensor:
    """Sum over the last dimension by pairwise halving, in elementwise adds only.

    A reduction kernel splits a sum over threads by the tensor's shape (CUDA's, by the number of outputs too),
    so one pair's distance could change in its last bits with the batch it is computed in; elementwise adds in
    a fixed order give the same bits in any batch, on any device.
    """
    while t.shape[-1] > 1:
        half = t.shape[-1] // 2
        head = t[..., :half] + t[..., half:2 * half]
        t = torch.cat([head, t[..., 2 * half:]], dim=-1) if t.shape[-1] % 2 else head
    return t[..., 0]


def _unit_rows(x: Tensor) -> Tensor:
    """Rows scaled to unit length (the cosine metric), each row's norm summed in `_sum_last`'s fixed order."""
    return x / _sum_last(x * x).sqrt().clamp_min(1e-12).unsqueeze(1)


def _certain(last_approx: Tensor, kth: Tensor, q: Tensor, r_norm: float, metric: str) -> Tensor:
    """Rows whose k-th exact neighbour beats every reference outside the candidates, rounding included.

    A non-candidate's expansion value is at least the last candidate's; the expansion and the exact squared
    distance each differ from the true one by at most about ``D u (|q| + |r|)^2`` (``u`` the unit roundoff),
    so twice their sum, ``(4 D + 8) u (|q| + max |r|)^2``, is a safe margin. The extra ``16 u`` on the k-th
    keeps it strictly ahead after the square root.
    """
    u = torch.finfo(q.dtype).eps / 2
    dim = q.shape[1]
    if metric == "euclidean":
        margin = (4 * dim + 8) * u * (q.norm(dim=1) + r_norm) ** 2
        reach = kth.square() * (1 + 16 * u)
    else:  # unit vectors; 1 - cos against half the squared difference
        margin = torch.full_like(kth, (4 * dim + 8) * u * 4)
        reach = kth * (1 + 16 * u)
    return last_approx - margin > reach


# ---------------------------------------------------------------------------
# spread over processes
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardedSearch:
    """`knn` spread over the ``world_size`` processes of a ``torch.distributed`` group (a `NeighbourSearch`).

    Every process calls it with the same arguments (each holding the whole matrix); process 0 gets the lists,
    bit for bit those of `knn` in one process, and the others get None.

    * The set searched against itself: process ``r`` holds the reference rows ``[r N / W, (r + 1) N / W)``
      and searches every query against them (its own row excluded by global index); the partial top-k lists
      (distances and global indices) are exchanged with ``all_gather`` in blocks of ``rows_per_exchange``
      queries and merged by (distance, index) (`merge_neighbours`). Memory per process: its share of the
      products plus one exchange block, never ``[N, N]``. When a share would hold ``k`` references or fewer
      (tiny sets) process 0 searches alone.
    * A separate reference set (the subsamples of ``reference_size``): it is small, so every process keeps
      all of it and takes a contiguous share of the queries instead: no merge, ``1 / W`` of the exchange,
      and the same split of the products.

    Args:
        rank: this process's rank in ``group``.
        world_size: the number of processes in ``group``.
        group: the process group (None: the default one, e.g. the one Lightning's DDP strategy set up). Its
            backend must take tensors on the inputs' device (gloo: CPU, NCCL: CUDA).
        rows_per_exchange: query rows per exchange of partial lists.
    """

    rank: int
    world_size: int
    group: Any = None
    rows_per_exchange: int = 65536

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size or self.rows_per_exchange < 1:
            raise ValueError(f"rank {self.rank} of {self.world_size} processes, rows_per_exchange "
                             f"{self.rows_per_exchange}: need 0 <= rank < world_size and a positive block")

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def __call__(self, queries: Tensor, references: Tensor | None = None, *, k: int, chunk_size: int = 1024,
                 metric: Metric = "euclidean", ref_chunk_size: int | None = None,
                 self_index: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
        # The same check on every process before any exchange: all of them fail together, none waits.
        q_all, r_all, self_mode, own = _checked(queries, references, k, chunk_size, metric, True, ref_chunk_size,
                                                self_index)
        opts: dict[str, Any] = {"k": k, "chunk_size": chunk_size, "metric": metric, "ref_chunk_size": ref_chunk_size}
        if self_mode:
            return self._by_reference_rows(q_all, opts)
        return self._by_query_rows(q_all, r_all, own, opts)

    def _bounds(self, n: int) -> list[int]:
        return [n * r // self.world_size for r in range(self.world_size + 1)]

    def _gather(self, t: Tensor) -> list[Tensor]:
        import torch.distributed as dist

        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return parts

    def _by_reference_rows(self, x: Tensor, opts: dict[str, Any]) -> tuple[Tensor, Tensor] | None:
        n, k = x.shape[0], opts["k"]
        bounds = self._bounds(n)
        if min(b - a for a, b in zip(bounds, bounds[1:])) <= k:
            return knn(x, **opts) if self.is_root else None
        lo, hi = bounds[self.rank], bounds[self.rank + 1]
        out_d = torch.empty(n, k, dtype=x.dtype, device=x.device) if self.is_root else None
        out_i = torch.empty(n, k, dtype=torch.int64, device=x.device) if self.is_root else None
        for s in range(0, n, self.rows_per_exchange):
            e = min(s + self.rows_per_exchange, n)
            rows = torch.arange(s, e, device=x.device)
            own = torch.where((rows >= lo) & (rows < hi), rows - lo, -1)
            d, i = knn(x[s:e], x[lo:hi], self_index=own, **opts)
            parts_d, parts_i = self._gather(d), self._gather(i + lo)
            if out_d is not None and out_i is not None:
                out_d[s:e], out_i[s:e] = merge_neighbours(torch.cat(parts_d, 1), torch.cat(parts_i, 1), k)
        return (out_d, out_i) if out_d is not None and out_i is not None else None

    def _by_query_rows(self, q: Tensor, r: Tensor, own: Tensor | None,
                       opts: dict[str, Any]) -> tuple[Tensor, Tensor] | None:
        bounds = self._bounds(q.shape[0])
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
        lo, hi = bounds[self.rank], bounds[self.rank + 1]
        d, i = knn(q[lo:hi], r, self_index=own[lo:hi] if own is not None else None, **opts)
        pad = max(sizes) - (hi - lo)  # all_gather takes equal shapes
        parts_d = self._gather(torch.nn.functional.pad(d, (0, 0, 0, pad)))
        parts_i = self._gather(torch.nn.functional.pad(i, (0, 0, 0, pad)))
        if not self.is_root:
            return None
        return (torch.cat([p[:m] for p, m in zip(parts_d, sizes)]),
                torch.cat([p[:m] for p, m in zip(parts_i, sizes)]))
