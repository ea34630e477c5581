"""Exact k-nearest-neighbour search, blockwise over queries and gallery, on all local devices.

Ranking rule (the one every metric of :mod:`dml_jax.evaluation` uses): reference items are
ordered by their squared Euclidean distance to the query, ties broken by the lower reference
index. For L2-normalised inputs this is the cosine-similarity ranking
(``||q - r||^2 = 2 - 2 cos(q, r)``).

How the rule is made exact and backend-independent:

1. **Candidate search in float32.** Each query's ``c = k + extra`` nearest candidates are found
   with the Gram form ``||q||^2 + ||r||^2 - 2 q.r`` in float32, either by a jitted JAX kernel
   (``jax.lax.top_k`` over ``[query_block, reference_block]`` tiles, merged across reference
   blocks; matmuls at ``precision=HIGHEST``) or by faiss's exact ``IndexFlatL2`` when it is
   installed and JAX runs on CPU.
2. **Exact re-ranking in float64 on the host.** The candidates' distances are recomputed as
   ``sum((q - r)^2)`` in float64 (each squared float32 difference is exact in float64) and
   sorted by ``(distance, index)``.
3. **Certification.** The float32 Gram form is off by at most
   ``eps = (2 D + 8) 2^-24 (||q||^2 + max_r ||r||^2)``. Every non-candidate has a float32
   distance at least the last candidate's, so when ``last - eps`` exceeds the k-th exact
   distance no non-candidate can enter (or tie into) the top k. Rows that fail this test (only
   possible with very many near-ties, e.g. exact duplicates) are recomputed against the whole
   reference set in float64.

The returned neighbours therefore depend only on the data: the JAX and faiss backends, any
block sizes and any number of devices give identical indices, and they equal a float64 NumPy
brute force computed with the same ``sum((q - r)^2)`` formula.

Memory: the JAX kernel holds one ``[query_block, reference_block]`` float32 tile per device plus
the replicated reference set; the host holds ``[Q, k]`` results and ``[256, c, D]`` float64 for
re-ranking. No ``[Q, N]`` matrix is ever built (unless ``Q * N`` fits in one tile).
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Backend = Literal["auto", "jax", "faiss"]

_U32 = 2.0**-24  # float32 unit roundoff
_RERANK_ROWS = 256


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str) -> str:
    """``"auto"``: ``"faiss"`` if faiss imports and JAX runs on CPU, else ``"jax"``."""
    if backend not in ("auto", "jax", "faiss"):
        raise ValueError(f"`backend` must be one of ('auto', 'jax', 'faiss'); got {backend!r}.")
    if backend == "auto":
        return "faiss" if jax.default_backend() == "cpu" and _faiss_available() else "jax"
    if backend == "faiss" and not _faiss_available():
        raise ValueError("backend='faiss' needs the faiss package (pip install faiss-cpu).")
    return backend


def check_finite_2d(x: np.ndarray, name: str) -> np.ndarray:
    """Returns ``x`` as float32 ``[N, D]`` or raises ``ValueError`` (rank, dtype, NaN/inf)."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"`{name}` must have shape [N, D]; got shape {x.shape}.")
    if not np.issubdtype(x.dtype, np.floating) and x.dtype.name != "bfloat16":
        raise ValueError(f"`{name}` must be a floating array; got dtype {x.dtype}.")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        bad = int(np.sum(~np.all(np.isfinite(x), axis=1)))
        raise ValueError(f"`{name}` has {bad} row(s) with NaN or inf values.")
    return x


# --------------------------------------------------------------------------------------------
# JAX candidate search
# --------------------------------------------------------------------------------------------


def _tile_topc(q, q_self, ref_blocks, ref_sq_blocks, *, c):
    """Top-``c`` smallest float32 distances of ``q [B, D]`` over ``ref_blocks [nb, G, D]``.

    Holds one ``[B, G]`` tile and the running ``[B, c]`` best. ``q_self[i]`` is the reference
    index excluded for query ``i`` (-1: none). Padding rows have ``ref_sq = inf``.
    Ties: ``lax.top_k`` keeps the lower position first; the running best (all lower indices,
    itself ordered by (distance, index)) precedes each new block, so ties resolve to the lower
    reference index across blocks too.
    """
    b = q.shape[0]
    g = ref_blocks.shape[1]
    q_sq = jnp.sum(q * q, axis=1)

    def body(carry, xs):
        best_d, best_i = carry
        r, r_sq, base = xs
        dots = jnp.matmul(q, r.T, precision=jax.lax.Precision.HIGHEST)
        d = jnp.maximum(q_sq[:, None] + r_sq[None, :] - 2.0 * dots, 0.0)
        col = base + jnp.arange(g, dtype=jnp.int32)
        d = jnp.where(col[None, :] == q_self[:, None], jnp.inf, d)
        d = jnp.where(jnp.isinf(r_sq)[None, :], jnp.inf, d)
        cand_d = jnp.concatenate([best_d, d], axis=1)
        cand_i = jnp.concatenate([best_i, jnp.broadcast_to(col, (b, g))], axis=1)
        neg, pos = jax.lax.top_k(-cand_d, c)
        return (-neg, jnp.take_along_axis(cand_i, pos, axis=1)), None

    # Derived from the (device-varying) inputs so the carry's type matches under shard_map.
    init = (
        jnp.zeros((b, c), jnp.float32) + jnp.inf + 0.0 * q_sq[:, None],
        jnp.zeros((b, c), jnp.int32) + jnp.iinfo(jnp.int32).max + 0 * q_self[:, None],
    )
    bases = jnp.arange(ref_blocks.shape[0], dtype=jnp.int32) * g
    (best_d, best_i), _ = jax.lax.scan(body, init, (ref_blocks, ref_sq_blocks, bases))
    return best_d, best_i


@functools.lru_cache(maxsize=32)
def _compiled_search(c: int, devices: tuple):
    """jit(shard_map(_tile_topc)) over a ``('data',)`` mesh of ``devices`` (cached per c)."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(devices), ("data",))
    fn = jax.shard_map(
        functools.partial(_tile_topc, c=c),
        mesh=mesh,
        in_specs=(P("data"), P("data"), P(), P()),
        out_specs=(P("data"), P("data")),
    )
    return jax.jit(fn), NamedSharding(mesh, P("data")), NamedSharding(mesh, P())


def _search_jax(q, q_self, ref, c, query_block, reference_block):
    """Float32 top-``c`` candidates with JAX; returns ``(d32 [Q, c], idx [Q, c])`` on host."""
    devices = tuple(jax.local_devices())
    nd = len(devices)
    n, dim = ref.shape
    g = min(reference_block, n)
    nb = math.ceil(n / g)
    ref_pad = np.zeros((nb * g, dim), np.float32)
    ref_pad[:n] = ref
    ref_sq = np.full((nb * g,), np.inf, np.float32)
    ref_sq[:n] = np.sum(ref.astype(np.float32) ** 2, axis=1)
    fn, row_sharding, repl = _compiled_search(c, devices)
    ref_blocks = jax.device_put(ref_pad.reshape(nb, g, dim), repl)
    ref_sq_blocks = jax.device_put(ref_sq.reshape(nb, g), repl)
    # All devices get query_block rows per step: identical tile shapes on 1 and 8 devices.
    bq = min(query_block, math.ceil(q.shape[0] / nd))
    step = bq * nd
    outs = []
    for start in range(0, q.shape[0], step):
        qb = q[start : start + step]
        sb = q_self[start : start + step]
        m = qb.shape[0]
        if m < step:
            qb = np.concatenate([qb, np.zeros((step - m, dim), np.float32)])
            sb = np.concatenate([sb, np.full((step - m,), -1, np.int32)])
        d, i = fn(
            jax.device_put(qb, row_sharding),
            jax.device_put(sb, row_sharding),
            ref_blocks,
            ref_sq_blocks,
        )
        outs.append((d, i, m))
    d32 = np.concatenate([np.asarray(d)[:m] for d, _, m in outs])
    idx = np.concatenate([np.asarray(i)[:m] for _, i, m in outs]).astype(np.int64)
    return d32, idx


def _search_faiss(q, q_self, ref, c):
    """Float32 top-``c`` candidates with faiss ``IndexFlatL2`` (self removed by index)."""
    import faiss

    index = faiss.IndexFlatL2(ref.shape[1])
    index.add(ref)
    has_self = bool(np.any(q_self >= 0))
    kk = min(c + 1, ref.shape[0]) if has_self else c
    d32, idx = index.search(q, kk)
    if not has_self:
        return d32, idx.astype(np.int64)
    is_self = idx == q_self[:, None]
    # Drop the self column where present, else the last column (its distance is still >= every
    # kept candidate, so the certification bound stays valid using the dropped value).
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), kk - 1)
    keep = np.ones_like(is_self)
    keep[np.arange(q.shape[0]), drop] = False
    out_i = idx[keep].reshape(q.shape[0], kk - 1)[:, :c]
    out_d = d32[keep].reshape(q.shape[0], kk - 1)[:, :c]
    # The bound for non-candidates is the largest float32 distance faiss returned.
    last = np.maximum(out_d[:, -1], d32[:, -1])
    out_d = out_d.copy()
    out_d[:, -1] = last
    return out_d, out_i.astype(np.int64)


# --------------------------------------------------------------------------------------------
# Exact float64 re-ranking
# --------------------------------------------------------------------------------------------


def exact_sq_distances(q64: np.ndarray, ref64: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """float64 ``sum((q_i - ref_j)^2)`` for ``j = idx[i, :]``; ``q64 [b, D]``, ``idx [b, c]``.

    Holds ``[b, c, D]`` float64. This is the canonical distance the ranking rule sorts by.
    """
    diff = ref64[idx] - q64[:, None, :]
    return np.sum(diff * diff, axis=-1)


def _sort_rows(d: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((idx, d), axis=-1)[:, :k]
    return np.take_along_axis(d, order, 1), np.take_along_axis(idx, order, 1)


def _full_rows(q64, q_self, ref64, k, chunk=4096):
    """Exact top-k of a few rows against all references (float64, chunks of ``chunk``)."""
    n = ref64.shape[0]
    out_d = np.empty((q64.shape[0], k))
    out_i = np.empty((q64.shape[0], k), np.int64)
    for r in range(q64.shape[0]):
        parts = []
        for s in range(0, n, chunk):
            cols = np.arange(s, min(s + chunk, n))
            parts.append(exact_sq_distances(q64[r : r + 1], ref64, cols[None, :])[0])
        d = np.concatenate(parts)
        cols = np.arange(n)
        if q_self[r] >= 0:
            keep = cols != q_self[r]
            d, cols = d[keep], cols[keep]
        part = np.argpartition(d, k - 1)[:k] if k < d.shape[0] else np.arange(d.shape[0])
        # include every element tied with the k-th value so index order decides
        kth = np.max(d[part])
        sel = np.nonzero(d <= kth)[0]
        dd, ii = _sort_rows(d[sel][None], cols[sel][None], k)
        out_d[r], out_i[r] = dd[0], ii[0]
    return out_d, out_i


def _rerank(q, q_self, ref, d32, cand, k, n_valid):
    """Exact (float64, index) order of the candidates, certified; see the module docstring."""
    ref64 = ref.astype(np.float64)
    q64 = q.astype(np.float64)
    nq, c = cand.shape
    dim = ref.shape[1]
    eps_scale = (2 * dim + 8) * _U32 * 1.01
    ref_sq_max = float(np.max(np.sum(ref64 * ref64, axis=1))) if ref.shape[0] else 0.0
    out_d = np.empty((nq, k))
    out_i = np.empty((nq, k), np.int64)
    for s in range(0, nq, _RERANK_ROWS):
        e = min(s + _RERANK_ROWS, nq)
        d64 = exact_sq_distances(q64[s:e], ref64, cand[s:e])
        dd, ii = _sort_rows(d64, cand[s:e], k)
        out_d[s:e], out_i[s:e] = dd, ii
    if c >= n_valid:  # every valid reference was a candidate: nothing to certify
        return out_d, out_i
    q_sq = np.sum(q64 * q64, axis=1)
    eps = eps_scale * (q_sq + ref_sq_max)
    last = d32[:, -1].astype(np.float64)
    kth = out_d[:, -1]
    ok = (last - eps) > kth * (1.0 + 1e-12) + 1e-300
    bad = np.nonzero(~ok)[0]
    if bad.size:
        fd, fi = _full_rows(q64[bad], q_self[bad], ref64, k)
        out_d[bad], out_i[bad] = fd, fi
    return out_d, out_i


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def search_rows(
    query: np.ndarray,
    query_self: np.ndarray,
    reference: np.ndarray,
    k: int,
    *,
    backend: str = "auto",
    query_block: int = 1024,
    reference_block: int = 16384,
    extra: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of validated float32 rows; ``query_self[i]`` = excluded index or -1.

    Returns ``(sq_distances float64 [Q, k], indices int64 [Q, k])``. Internal helper of
    :func:`knn` and :func:`dml_jax.evaluation.retrieval_metrics` (no input checks).
    """
    n = reference.shape[0]
    nq = query.shape[0]
    n_valid = n - (1 if np.any(query_self >= 0) else 0)
    if nq == 0:
        return np.empty((0, k)), np.empty((0, k), np.int64)
    if extra is None:
        extra = max(8, k // 4)
    c = min(k + extra, n_valid)
    backend = resolve_backend(backend)
    if backend == "faiss":
        d32, cand = _search_faiss(query, query_self, reference, c)
    else:
        d32, cand = _search_jax(query, query_self, reference, c, query_block, reference_block)
    return _rerank(query, query_self, reference, d32, cand, k, n_valid)


def knn(
    query: jax.typing.ArrayLike,
    reference: jax.typing.ArrayLike | None = None,
    *,
    k: int,
    backend: Backend = "auto",
    query_block: int = 1024,
    reference_block: int = 16384,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by squared Euclidean distance, ties to the lower index.

    For each query ``q`` the references are ordered by ``(||q - r||^2, index)`` where the
    squared distance is ``sum((q - r)^2)`` evaluated in float64 (the float32 search only proposes
    certified candidates; see the module docstring). With ``reference=None`` the query set is
    its own gallery and each query's own index is excluded (by index, not by distance: an exact
    duplicate of a query is still its neighbour at distance 0).

    Args:
      query: float ``[Q, D]``.
      reference: float ``[N, D]``, or None for the query set itself.
      k: number of neighbours, ``1 <= k <= N`` (``N - 1`` without ``reference``).
      backend: ``"jax"`` (jitted blockwise search sharded over ``jax.local_devices()``),
        ``"faiss"`` (faiss ``IndexFlatL2``), or ``"auto"`` (faiss when installed and JAX runs
        on CPU, where it is faster; JAX otherwise). All give identical results.
      query_block: queries per device per step (JAX backend).
      reference_block: references per tile (JAX backend).

    Returns:
      ``(indices, sq_distances)``: NumPy int64 ``[Q, k]`` and float64 ``[Q, k]``, each row
      sorted by ``(distance, index)``.

    Memory: ``[query_block, reference_block]`` float32 per device plus the reference set;
    never ``[Q, N]``.

    Raises:
      ValueError: wrong ranks or dtypes, mismatched ``D``, NaN/inf values, or ``k`` out of range.
    """
    q = check_finite_2d(query, "query")
    if reference is None:
        ref = q
        q_self = np.arange(q.shape[0], dtype=np.int32)
        n_valid = q.shape[0] - 1
    else:
        ref = check_finite_2d(reference, "reference")
        q_self = np.full((q.shape[0],), -1, np.int32)
        n_valid = ref.shape[0]
        if ref.shape[1] != q.shape[1]:
            raise ValueError(
                f"`query` has dimension {q.shape[1]} but `reference` has {ref.shape[1]}."
            )
    k = int(k)
    if not 1 <= k <= n_valid:
        raise ValueError(
            f"`k` must be in [1, {n_valid}] (the gallery size"
            f"{' minus the query itself' if reference is None else ''}); got {k}."
        )
    d, i = search_rows(
        q, q_self, ref, k, backend=backend, query_block=query_block,
        reference_block=reference_block,
    )
    return i, d
