"""Cross-batch memory: the ring buffer's semantics, and the memory-enabled losses against
NumPy loop references (value and gradient) on memories partly filled, full, wrapped around,
with padding rows and labels that occur only in the memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dml_jax import losses
from tests.losses import reference as ref
from tests.losses import reference_memory as refm

# As tests/losses/test_baseline_losses.py: float32 against float64 loops.
VALUE_TOL = {"rtol": 1e-4, "atol": 1e-5}
GRAD_TOL = {"rtol": 2e-3, "atol": 2e-4}
DIM = 4

# (id, jax loss, reference, settings); RLL's reference takes `weights_at` (frozen weights).
CASES = [
    ("contrastive", losses.contrastive_loss, refm.contrastive,
     {"pos_margin": 0.3, "neg_margin": 2.5}),
    ("triplet_all", losses.triplet_loss, refm.triplet, {"mining": "all", "margin": 0.5}),
    ("triplet_batch_hard", losses.triplet_loss, refm.triplet,
     {"mining": "batch_hard", "margin": 0.5}),
    ("triplet_semi_hard", losses.triplet_loss, refm.triplet,
     {"mining": "semi_hard", "margin": 1.0}),
    ("multi_similarity", losses.multi_similarity_loss, refm.multi_similarity, {"beta": 10.0}),
    ("multi_similarity_mined", losses.multi_similarity_loss, refm.multi_similarity,
     {"epsilon": 0.1, "beta": 10.0}),
    ("ranked_list", losses.ranked_list_loss, refm.ranked_list,
     {"margin": 1.0, "alpha": 3.0, "t_p": 1.0}),
    ("ranked_list_official", losses.ranked_list_loss, refm.ranked_list,
     {"margin": 1.0, "alpha": 3.0, "t_p": 1.0, "query_weighting": "official"}),
]
IDS = [c[0] for c in CASES]


def stream(seed, sizes, labels_from=6, pad_every=4):
    """Batches ``(e [n, D], y [n], where [n])`` with labels in ``[0, labels_from)``."""
    rng = np.random.default_rng(seed)
    out = []
    for n in sizes:
        e = rng.normal(size=(n, DIM)).astype(np.float32)
        y = rng.integers(0, labels_from, size=n).astype(np.int32)
        where = np.arange(n) % pad_every != pad_every - 1
        out.append((e, y, where))
    return out


def filled(size, batches):
    """The memory after enqueueing ``batches``, and the ring reference's slots."""
    state = losses.xbm_init(size, DIM)
    mem = (np.zeros((size, DIM)), np.zeros(size, np.int32), np.zeros(size, bool), 0)
    for e, y, where in batches:
        state = losses.xbm_update(state, e, y, where=where)
        mem = refm.ring_update(*mem, e, y, where)
    return state, mem


# Memories: partly filled (16 slots, 6 written), exactly full, wrapped around twice with
# padding, and one holding a class of 40 rows (the triplet miners' sort-based path). Labels
# 0..5 (loss batch: 0..3 and 7, so 4 and 5 occur only in the memory; label 7 has no positive).
MEMORIES = {
    "partial": (16, [8]),
    "full": (9, [12]),
    "wrapped": (10, [7, 6, 8, 5]),
    "big_class": (48, [44]),
}


def memory_for(name):
    size, sizes = MEMORIES[name]
    batches = stream(1, sizes)
    if name == "big_class":
        e, y, where = batches[0]
        batches = [(e, np.where(np.arange(len(y)) % 10 == 0, y, 2).astype(np.int32), where)]
    return filled(size, batches)


def loss_batch(seed=0):
    rng = np.random.default_rng(seed)
    e = rng.normal(size=(10, DIM)).astype(np.float32)
    y = np.array([0, 0, 1, 1, 2, 3, 3, 2, 7, 0], np.int32)
    where = np.ones(10, bool)
    where[[3, 9]] = False
    return e, y, where


def test_update_matches_the_ring_one_row_at_a_time():
    state, (mem_e, mem_y, valid, nxt) = memory_for("wrapped")
    assert int(state.next) == nxt
    np.testing.assert_array_equal(state.valid, valid)
    np.testing.assert_array_equal(np.asarray(state.labels)[valid], mem_y[valid])
    np.testing.assert_array_equal(np.asarray(state.embeddings)[valid],
                                  mem_e[valid].astype(np.float32))
    assert state.embeddings.dtype == jnp.float32 and state.labels.dtype == jnp.int32
    assert state.valid.dtype == jnp.bool_ and state.next.dtype == jnp.int32


def test_update_order_wrap_and_skipped_rows():
    state = losses.xbm_init(5, 1)
    e = np.arange(4, dtype=np.float32)[:, None]
    state = losses.xbm_update(state, e, np.arange(4), where=np.array([1, 0, 1, 1], bool))
    np.testing.assert_array_equal(state.labels, [0, 2, 3, 0, 0])
    np.testing.assert_array_equal(state.valid, [1, 1, 1, 0, 0])
    assert int(state.next) == 3
    state = losses.xbm_update(state, 10 + e, 10 + np.arange(4))  # wraps: oldest overwritten
    np.testing.assert_array_equal(state.labels, [12, 13, 3, 10, 11])
    np.testing.assert_array_equal(state.embeddings[:, 0], [12, 13, 3, 10, 11])
    assert bool(jnp.all(state.valid)) and int(state.next) == 2


def test_a_batch_larger_than_the_memory_keeps_its_last_rows():
    state = losses.xbm_init(4, 1)
    state = losses.xbm_update(state, np.zeros((2, 1), np.float32), np.array([-1, -2]))
    y = np.arange(10)
    where = np.ones(10, bool)
    where[[8, 5]] = False
    state = losses.xbm_update(state, y[:, None].astype(np.float32), y, where=where)
    # 8 rows enqueued from slot 2: rows 4, 6, 7, 9 (the last four) survive, in slots 2, 3, 0, 1.
    assert int(state.next) == (2 + 8) % 4
    np.testing.assert_array_equal(state.labels, [7, 9, 4, 6])
    np.testing.assert_array_equal(state.embeddings[:, 0], [7, 9, 4, 6])


def test_update_and_memory_columns_take_no_gradient():
    state, _ = memory_for("partial")
    e, y, _ = loss_batch()
    g = jax.grad(lambda x: jnp.sum(losses.xbm_update(state, x, y).embeddings))(e)
    assert np.all(np.asarray(g) == 0)
    # The memory reaches every loss through with_memory's stop_gradient: one loss per way it is
    # laid out (unsorted, sorted by label for the triplet miners) and the hand-written VJP.
    for name, fn, _, kwargs in CASES:
        if name not in ("contrastive", "triplet_semi_hard", "ranked_list"):
            continue
        g_mem = jax.grad(lambda m, fn=fn, kwargs=kwargs: fn(
            e, y, memory=state._replace(embeddings=m), **kwargs))(state.embeddings)
        assert np.all(np.asarray(g_mem) == 0)


@pytest.mark.parametrize("memory", sorted(MEMORIES))
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_value_and_gradient_match_loop_reference(case, memory):
    _, fn, reference, kwargs = case
    state, (mem_e, mem_y, valid, _) = memory_for(memory)
    entries = refm.memory_entries(mem_e, mem_y, valid)
    e, y, where = loss_batch()
    value, grad = jax.value_and_grad(
        lambda x: fn(x, y, memory=state, where=where, **kwargs)
    )(e)
    frozen = {"weights_at": e} if reference is refm.ranked_list else {}
    expected = reference(e, y, entries, where=where, **kwargs)
    np.testing.assert_allclose(value, expected, **VALUE_TOL)
    plain = fn(e, y, where=where, **kwargs)
    assert abs(float(value) - float(plain)) > 1e-4, "degenerate case: the memory changes nothing"
    expected_grad = ref.numerical_grad(
        lambda x: reference(x, y, entries, where=where, **frozen, **kwargs), e
    )
    np.testing.assert_allclose(grad, expected_grad, **GRAD_TOL)
    assert np.all(np.asarray(grad)[~where] == 0)
    assert np.any(np.asarray(grad) != 0)


@pytest.mark.parametrize("class_rows,t_p", [(100, 1.0), (300, 0.0), (520, 1.0)])
def test_ranked_list_every_window_matches_loop_reference(class_rows, t_p):
    """The ranked list sums each row's positive list on a window of its two runs of
    label-ordered columns (batch and memory): 128 or 512 slots, the smallest that holds the
    largest class's runs, or whole rows past 512. A memory whose class 0 has ``class_rows``
    rows (scattered among other labels' rows) sends the view to each path in turn."""
    rng = np.random.default_rng(class_rows)
    size = class_rows + 40
    y_mem = np.concatenate([np.zeros(class_rows), rng.integers(1, 6, size=40)])
    mem = [(rng.normal(size=(size, DIM)).astype(np.float32),
            y_mem[rng.permutation(size)].astype(np.int32), np.ones(size, bool))]
    state, (mem_e, mem_y, valid, _) = filled(size, mem)
    entries = refm.memory_entries(mem_e, mem_y, valid)
    e, y, where = loss_batch()
    kw = {"margin": 1.0, "alpha": 3.0, "t_p": t_p}
    value, grad = jax.value_and_grad(
        lambda x: losses.ranked_list_loss(x, y, memory=state, where=where, **kw)
    )(e)
    np.testing.assert_allclose(value, refm.ranked_list(e, y, entries, where=where, **kw),
                               **VALUE_TOL)
    expected = ref.numerical_grad(
        lambda x: refm.ranked_list(x, y, entries, where=where, weights_at=e, **kw), e
    )
    np.testing.assert_allclose(grad, expected, **GRAD_TOL)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_memory_none_is_the_plain_loss_and_an_empty_memory_changes_nothing(case):
    _, fn, _, kwargs = case
    e, y, where = loss_batch()
    plain = jax.value_and_grad(lambda x: fn(x, y, where=where, **kwargs))(e)
    none = jax.value_and_grad(lambda x: fn(x, y, where=where, memory=None, **kwargs))(e)
    for a, b in zip(plain, none):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    empty = losses.xbm_init(5, DIM)._replace(
        embeddings=jnp.full((5, DIM), jnp.nan)  # invalid slots take no part, whatever they hold
    )
    value, grad = jax.value_and_grad(lambda x: fn(x, y, where=where, memory=empty, **kwargs))(e)
    np.testing.assert_allclose(value, plain[0], rtol=1e-6)
    np.testing.assert_allclose(grad, plain[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_nonfinite_valid_memory_row_gives_a_nan_loss(case):
    _, fn, _, kwargs = case
    state, _ = memory_for("partial")
    e, y, where = loss_batch()
    bad = state._replace(embeddings=state.embeddings.at[2, 1].set(jnp.inf))
    assert np.isnan(fn(e, y, where=where, memory=bad, **kwargs))


@pytest.mark.parametrize("mining", ["all", "semi_hard"])
def test_the_loss_and_update_are_jittable_and_vmappable(mining):
    # Value and gradient under vmap (the memory miners' custom VJP, mined_distance_sum,
    # included) equal the unbatched ones, for two different batches.
    state, _ = memory_for("wrapped")
    e, y, where = loss_batch()
    fn = jax.jit(jax.value_and_grad(
        lambda x, m: losses.triplet_loss(x, y, where=where, memory=m, mining=mining)))
    expected = [fn(x, state) for x in (e, 1.5 * e)]
    batched = jax.vmap(fn)(jnp.stack([e, 1.5 * e]), jax.tree.map(lambda a: jnp.stack([a, a]),
                                                                  state))
    for k in range(2):  # measured: bit-identical
        np.testing.assert_allclose(batched[0][k], expected[k][0], rtol=1e-6)
        np.testing.assert_allclose(batched[1][k], expected[k][1], rtol=1e-6, atol=1e-9)
    assert float(expected[0][0]) != float(expected[1][0])
    updated = jax.jit(losses.xbm_update)(state, e, y, where=where)
    assert int(updated.next) == (int(state.next) + int(where.sum())) % 10


def test_bad_memories_are_refused():
    with pytest.raises(ValueError, match="size"):
        losses.xbm_init(0, 4)
    with pytest.raises(ValueError, match="dim"):
        losses.xbm_init(4, -1)
    e, y, _ = loss_batch()
    with pytest.raises(ValueError, match="same dimension"):
        losses.contrastive_loss(e, y, memory=losses.xbm_init(4, DIM + 1))
    with pytest.raises(ValueError, match="memory holds 3-d rows"):
        losses.xbm_update(losses.xbm_init(4, 3), e, y)
    with pytest.raises(ValueError, match="XBMState"):
        losses.triplet_loss(e, y, memory=(e, y))


# The triplet miners' branches with a memory: the bucketed path (positives in two runs of at
# most RUN_SIZES slots) and the sort-based fallback, each forced by making every other
# branch return NaN (a switch that took one would fail the comparison).
TRIPLET_PATHS = {
    "all": ("_all_slotted", "_all_bucketed", "_all_sorted"),
    "semi_hard": ("_semi_hard_slotted", "_semi_hard_bucketed", "_semi_hard_sorted"),
}


def _nan_branch(d, *args, **kwargs):
    return jnp.full(d.shape, jnp.nan), jnp.float32(jnp.nan)


def _nan_terms(d, batch, margin, runs, slots):
    """A NaN stand-in for ``_semi_hard_bucketed``, which gives its terms as entries."""
    from dml_jax.losses import triplet

    nan = jnp.full((d.shape[0], 2 * slots), jnp.nan)
    return triplet._ChosenTerms(
        cols=jnp.zeros(nan.shape, jnp.int32), coef=nan, dist=nan, entries=jnp.int32(2),
        n_active=jnp.float32(jnp.nan), value=jnp.float32(jnp.nan))


def _nan_stand_in(name):
    return _nan_terms if name == "_semi_hard_bucketed" else _nan_branch


def force_triplet_branch(monkeypatch, mining, branch):
    """Leaves only ``branch`` ("slotted", "bucketed" or "sorted") of the ``mining`` miner."""
    from dml_jax.losses import _windows, triplet

    for name in TRIPLET_PATHS[mining]:
        if not name.endswith(branch):
            monkeypatch.setattr(triplet, name, _nan_stand_in(name))
    # Slot bounds that send every test view (some row has a positive) to ``branch``.
    monkeypatch.setattr(_windows, "SLOT_SIZES", (128,) if branch == "slotted" else (0,))
    monkeypatch.setattr(_windows, "RUN_SIZES", (128,) if branch == "bucketed" else (0,))


def mined_triplet(x, y, state, where, *, as_plain_columns=False, sort_by_label=True,
                  dense_coefficients=False, **kwargs):
    """``triplet_loss`` without its jit cache (so patched branches are traced).

    ``as_plain_columns``: the miner is not told which columns are the memory's (its
    ``[b, B + M]`` view is mined as plain columns, and summed as ``sum(C * d)``), which sends
    it to the slotted paths: a memory view otherwise always takes the bucketed one.
    ``dense_coefficients``: the memory view's miners give ``[b, B + M]`` coefficients summed as
    ``sum(C * d)``, the form they take under ``axis_name``, instead of the single-device
    gradient from their mining pass."""
    from dml_jax.losses import _batch, triplet
    from dml_jax.losses.memory import with_memory

    batch = _batch.pair_batch(x, y, where, None, sort_by_label=sort_by_label)
    batch = with_memory(batch, state, sort_by_label=sort_by_label)
    if not (as_plain_columns or dense_coefficients):
        return triplet.triplet_of_view(batch, axis_name=None, **kwargs)
    d = _batch.distances_of(batch, None)
    if as_plain_columns:
        batch = batch._replace(memory=batch.memory[:0])
    return triplet.triplet_from_distances(d, batch, axis_name=None, **kwargs)


# The forced branches on a memory with empty slots and labels only in it, and on one with a
# class of 40 rows (the natural-branch test above runs every memory).
@pytest.mark.parametrize("memory", ["partial", "big_class"])
@pytest.mark.parametrize("branch", ["bucketed", "sorted"])
@pytest.mark.parametrize("mining,margin", [("all", 0.5), ("semi_hard", 1.0)])
def test_forced_triplet_branches_match_loop_reference(mining, margin, branch, memory,
                                                      monkeypatch):
    force_triplet_branch(monkeypatch, mining, branch)
    state, (mem_e, mem_y, valid, _) = memory_for(memory)
    entries = refm.memory_entries(mem_e, mem_y, valid)
    e, y, where = loss_batch()
    kwargs = {"mining": mining, "margin": margin}
    value, grad = jax.value_and_grad(lambda x: mined_triplet(x, y, state, where, **kwargs))(e)
    assert np.isfinite(float(value)) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(value, refm.triplet(e, y, entries, where=where, **kwargs),
                               **VALUE_TOL)
    expected_grad = ref.numerical_grad(
        lambda x: refm.triplet(x, y, entries, where=where, **kwargs), e
    )
    np.testing.assert_allclose(grad, expected_grad, **GRAD_TOL)
    assert np.all(np.asarray(grad)[~where] == 0)


@pytest.mark.parametrize("limit", [0, 100])
def test_semi_hard_farthest_negatives_row_by_row_and_whole(limit, monkeypatch):
    """Bucketed semi-hard takes the farthest negative only in the rows where a positive has no
    harder one, one row at a time up to a limit (100: every row here) and past it (0) in
    whole-batch passes: both give the loop reference's value and gradient, and some row of
    this memory needs it (the farthest's distance is what decides its terms)."""
    from dml_jax.losses import triplet

    monkeypatch.setattr(triplet, "_tied_row_limit", lambda rows: limit)
    force_triplet_branch(monkeypatch, "semi_hard", "bucketed")
    state, (mem_e, mem_y, valid, _) = memory_for("big_class")
    entries = refm.memory_entries(mem_e, mem_y, valid)
    e, y, where = loss_batch()
    kwargs = {"mining": "semi_hard", "margin": 1.0}
    value, grad = jax.value_and_grad(lambda x: mined_triplet(x, y, state, where, **kwargs))(e)
    np.testing.assert_allclose(value, refm.triplet(e, y, entries, where=where, **kwargs),
                               **VALUE_TOL)
    expected_grad = ref.numerical_grad(
        lambda x: refm.triplet(x, y, entries, where=where, **kwargs), e)
    np.testing.assert_allclose(grad, expected_grad, **GRAD_TOL)
    monkeypatch.setattr(triplet, "_farthest_negatives", lambda d, neg, needs: (
        jnp.full(needs.shape, 1e3), jnp.zeros(needs.shape, jnp.int32)))
    assert abs(float(mined_triplet(e, y, state, where, **kwargs)) - float(value)) > 1e-3


@pytest.mark.parametrize("mining", ["all", "semi_hard"])
def test_a_memory_view_not_sorted_by_label_takes_the_fallback(mining, monkeypatch):
    # The bucketed path finds each anchor's positives from the label-sorted columns; on a view
    # whose columns are in their own order it must not run (NaN if it did) and the sort-based
    # fallback must give the reference.
    from dml_jax.losses import triplet

    monkeypatch.setattr(triplet, TRIPLET_PATHS[mining][1],
                        _nan_stand_in(TRIPLET_PATHS[mining][1]))
    state, (mem_e, mem_y, valid, _) = memory_for("big_class")
    entries = refm.memory_entries(mem_e, mem_y, valid)
    e, y, where = loss_batch()
    kwargs = {"mining": mining, "margin": 0.5}
    value = mined_triplet(e, y, state, where, sort_by_label=False, **kwargs)
    np.testing.assert_allclose(value, refm.triplet(e, y, entries, where=where, **kwargs),
                               **VALUE_TOL)
    assert np.isnan(mined_triplet(e, y, state, where, **kwargs))  # sorted: bucketed


def tied_memory():
    """A memory holding copies of loss-batch rows (exact distance ties with batch columns),
    rows repeated within itself, a padding slot, a class of one row (label 9) and labels
    only in the memory; written twice around a ring of 23 slots."""
    e, y, _ = loss_batch()
    rng = np.random.default_rng(3)
    extra = np.round(rng.normal(size=(8, DIM)) * 2) / 2  # coarse grid: repeated distances
    rows = np.concatenate([e, e[:4], extra, extra[:3], e[5:7]]).astype(np.float32)
    labels = np.concatenate([y, y[:4], rng.integers(0, 6, 8), [4, 5, 9], y[5:7]]).astype(
        np.int32)
    where = np.ones(len(labels), bool)
    where[7] = False
    return filled(23, [(rows[:15], labels[:15], where[:15]), (rows[15:], labels[15:], where[15:]),
                       (rows[:12], labels[:12], where[:12])])


@pytest.mark.parametrize("margin", [0.3, 1.0, -0.2])
@pytest.mark.parametrize("mining", ["all", "semi_hard"])
def test_triplet_branches_agree_on_ties(mining, margin, monkeypatch):
    """Exactly tied negatives: "all"'s bucketed path shares the coefficient among them as the
    slotted one does; semi-hard's gives each term's to one of them, the first column at a
    closest value and the last at the farthest, as the sort-based path does, both in its
    single-device form (the sparse gradient) and as dense coefficients (the form it takes
    under ``axis_name``). The reference's gradient is undefined at such ties: the paths are
    compared."""
    state, (mem_e, mem_y, valid, _) = tied_memory()
    entries = refm.memory_entries(mem_e, mem_y, valid)
    e, y, where = loss_batch()
    kwargs = {"mining": mining, "margin": margin}
    partner = "slotted" if mining == "all" else "sorted"
    out = {}
    for branch, dense in (("bucketed", False), ("bucketed", True), (partner, False)):
        with monkeypatch.context() as patch:
            force_triplet_branch(patch, mining, branch)
            plain = branch == "slotted"
            out[branch, dense] = jax.value_and_grad(lambda x, plain=plain, dense=dense: (
                mined_triplet(x, y, state, where, as_plain_columns=plain,
                              dense_coefficients=dense, **kwargs)))(e)
    expected = out[partner, False]
    for dense in (False, True):
        value, grad = out["bucketed", dense]
        np.testing.assert_allclose(value, expected[0], rtol=1e-6)
        np.testing.assert_allclose(grad, expected[1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(value, refm.triplet(e, y, entries, where=where, **kwargs),
                                   **VALUE_TOL)
        assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("mining", ["all", "semi_hard"])
def test_a_nonfinite_memory_row_gives_a_nan_triplet_loss_on_the_bucketed_path(mining):
    state, _ = memory_for("big_class")  # a class of 40 memory rows: past the slotted paths
    e, y, where = loss_batch()
    bad = state._replace(embeddings=state.embeddings.at[5, 0].set(jnp.nan))
    assert np.isnan(losses.triplet_loss(e, y, where=where, memory=bad, mining=mining))


@pytest.mark.parametrize("with_start", [False, True])
@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("width,finite", [(128, 0), (128, 5), (128, 33), (128, 96),
                                          (128, 128), (20, 20), (100, 70), (100, 100)])
def test_count_below_compares_only_the_chunks_with_finite_values(width, finite, strict,
                                                                 with_start):
    # The bucketed miners count, per entry of d, the sorted slot values below it; the chunks
    # of slots that are +inf in every row are skipped (a loop of run-time length), and a
    # width that is no multiple of the chunk is padded with +inf. With `start` (the bucket
    # scatters' offsets) the counts come out with it added.
    from dml_jax.losses import triplet

    rng = np.random.default_rng(finite)
    values = np.full((6, width), np.inf, np.float32)
    for row, n in enumerate([finite, finite // 2, 0, finite, 1, finite]):
        values[row, :n] = np.sort(rng.integers(0, 9, size=n) / 4)  # repeated values: ties
    d = (rng.integers(0, 10, size=(6, 50)) / 4).astype(np.float32)
    d[0, :3] = [0.0, 2.0, 9.0]
    start = rng.integers(0, 1000, size=d.shape).astype(np.int32) if with_start else None
    count = jax.jit(triplet._count_below, static_argnums=2)(
        jnp.asarray(values), jnp.asarray(d), strict,
        None if start is None else jnp.asarray(start))
    below = np.less if strict else np.less_equal
    expected = below(values[:, None, :], d[:, :, None]).sum(axis=2)
    if with_start:
        expected = expected + start
    np.testing.assert_array_equal(np.asarray(count), expected)


@pytest.mark.parametrize("op,init", [("add", 0), ("min", np.inf)])
@pytest.mark.parametrize("columns", [50, 53])
def test_row_buckets_combine_the_interleaved_copies(op, init, columns):
    # The bucketed miners' per-row scatters write into interleaved copies of each row's table
    # (column n into copy n % copies, at the flat index bucket + _bucket_offsets) and combine
    # them: the result is the plain per-row bucket reduction, with runs of one bucket (as when
    # every negative is active), empty buckets at `init`, and a column count that is no
    # multiple of the copies.
    from dml_jax.losses import triplet

    rng = np.random.default_rng(columns)
    rows, width = 5, 7
    buckets = rng.integers(0, width - 1, size=(rows, columns)).astype(np.int32)  # last empty
    buckets[0] = 2
    buckets[1, 10:40] = 0
    if op == "add":
        values = rng.integers(0, 2, size=(rows, columns)).astype(np.int32)
    else:
        values = rng.integers(0, 20, size=(rows, columns)).astype(np.float32) / 4
    index = jnp.asarray(buckets) + triplet._bucket_offsets(buckets.shape, width)
    out = jax.jit(triplet._row_buckets, static_argnums=(0, 3, 4))(
        op, jnp.asarray(values), index, width, init)
    expected = np.full((rows, width), init, values.dtype)
    for a in range(rows):
        for n in range(columns):
            k = buckets[a, n]
            expected[a, k] = (expected[a, k] + values[a, n] if op == "add"
                              else min(expected[a, k], values[a, n]))
    np.testing.assert_array_equal(np.asarray(out), expected)


@pytest.mark.parametrize("width", [32, 128, 512])
def test_stable_order_is_a_stable_argsort(width):
    # The bucketed triplet miners sort their positive slots by counting predecessors; ties
    # (repeated distances, the unfilled slots' inf) must keep index order, as a stable sort.
    from dml_jax.losses import triplet

    rng = np.random.default_rng(width)
    values = rng.integers(0, 7, size=(9, width)).astype(np.float32) / 3
    values[:, width // 2:] = np.inf
    values[::3, :5] = 0.0
    values[4] = rng.normal(size=width)
    order = jax.jit(triplet._stable_order)(jnp.asarray(values))
    np.testing.assert_array_equal(np.asarray(order), np.argsort(values, axis=1, kind="stable"))
