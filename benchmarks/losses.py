"""Forward+backward time of each loss against pytorch-metric-learning and the matmul floor.

    python benchmarks/losses.py [--batch 1024 --dim 512 --per-class 8 --repeats 10]

Same process, same inputs (float32 ``[B, D]``, ``B / per_class`` classes; the losses on
anchor/positive pairs -- N-pair, angular and the symmetrical-synthesis ones -- get the paper's
layout instead, ``B / 2`` classes of two consecutive rows). For each loss it prints dml_jax's
median time, the peer's (pytorch-metric-learning on torch CPU, configured to the same semantics
where one exists), the speed-up ``peer / dml_jax`` (the median over three rounds of the ratio of
the two sides' medians in the round), the ratio to the matmul floor (``e @ e.T`` and one
``[B, B] @ [B, D]``, forward+backward in JAX), the ratio to the plain contrastive loss on the
same batch (both timed alternately with the loss, each ratio the median over the loss's calls of
its time over the floor's / contrastive's call right after it; each timed call right after an
untimed one of the same function, as the peer's calls follow each other), and whether the two
values agree. Each block of calls starts with 0.2 s of untimed ones. The losses on learned
class parameters (``benchmarks/losses_proxy.py``: Proxy-Anchor, ProxyNCA,
ArcFace, CosFace, SoftTriple) get one parameter row per class (SoftTriple: 10) and both sides
differentiate it too. By default glibc is told to keep freed memory first
(:func:`dml_jax.host_memory.retain_freed_memory`, as the experiment scripts do; both sides of
every ratio run under it): otherwise every call maps its buffers afresh, page by page, once they
pass 32 MB. ``--allocator default`` measures glibc's own settings. Needs the ``bench`` extra
(torch, pytorch-metric-learning).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dml_jax import host_memory, losses

# Losses on anchor/positive pairs: they get the P x 2 layout.
PAIR_LAYOUT = ("npair", "angular", "symm")


def cpu_description() -> str:
    """The CPU model (with its family and model numbers: a VM may name only the vendor line, as
    "AMD EPYC" for several generations) and whether it has AVX-512 (ratios move with both),
    from /proc/cpuinfo."""
    model, avx512, numbers = platform.processor() or platform.machine(), False, {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key == "model name" and model in ("", platform.machine(), "x86_64"):
                    model = line.split(":", 1)[1].strip()
                if key in ("cpu family", "model") and key not in numbers:
                    numbers[key] = line.split(":", 1)[1].strip()
                if key == "flags":
                    avx512 = avx512 or "avx512f" in line.split()
    except OSError:
        pass
    if numbers:
        model += f" (family {numbers.get('cpu family', '?')}, model {numbers.get('model', '?')})"
    return f"{model}, {'AVX-512' if avx512 else 'no AVX-512'}"


@jax.jit
def pair_floor(e: jax.Array, cols: jax.Array) -> jax.Array:
    """The least work of a pair loss's forward+backward: ``e @ cols.T`` (the forward
    similarities ``[B, M]``) and one ``[B, M] @ [M, D]`` product (the backward)."""
    return (e @ cols.T) @ cols


@jax.jit
def class_floor(e: jax.Array, params: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The least work of a loss on learned class parameters ``[C, D]`` that differentiates
    both: ``e @ params.T`` (forward ``[B, C]``) and the two backward products ``[B, C] @ [C, D]``
    and ``[B, C]^T @ [B, D]``."""
    s = e @ params.T
    return s @ params, s.T @ e


def _timed(fn: Callable, *args) -> float:
    """Seconds of one call of ``fn``, right after an untimed one: the loss, its floor and the
    baseline take turns, and a call after another function's (the 11 ms contrastive step
    evicts a 3 ms proxy step's inputs from the caches) measured 10% slower than in a loop,
    which is how the peer's calls run."""
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t


# Both sides are timed in ROUNDS alternating blocks, so a slow phase of a shared machine (they
# last seconds) falls on both. Each block starts with WARM_UP_S seconds of untimed calls of what
# it times (at least one), so that both sides are timed in the steady state of a training loop:
# after a pause (0.1 s, which an earlier version took to let torch's threads settle) this 2-core
# VM ran a 1.3 ms ArcFace step at ~2 ms for dozens of calls, and the first two or three XLA
# calls right after a torch block are slow too. Every timed JAX call also follows an untimed one
# (see `_timed`).
ROUNDS = 3
WARM_UP_S = 0.2
# Width of the table's name column ("symm_triplet_semi_hard (pairs)" is the longest).
NAME_WIDTH = 32


def warm_up(*calls: Callable[[], object]) -> None:
    """Run ``calls`` in turn, untimed, until :data:`WARM_UP_S` seconds have passed (each at
    least once)."""
    end = time.perf_counter() + WARM_UP_S
    while True:
        for call in calls:
            jax.block_until_ready(call())
        if time.perf_counter() >= end:
            return


def jax_timer(
    fn: Callable, e: jax.Array, y: jax.Array, params: jax.Array | None = None,
    *, floor_cols: jax.Array | None = None, baseline: Callable | None = None, **kwargs,
) -> tuple[float, Callable[[int], tuple[list, list, list]]]:
    """The loss value of jitted value_and_grad (for the embeddings, and for ``params`` when
    given: ``fn(e, y, params)``), and a block timer: ``block(n)`` times ``n`` calls, each
    followed by one of the matmul floor :func:`pair_floor` (``floor_cols``: the candidate
    columns, default ``e``; with ``params``: :func:`class_floor`) and one of the jitted step
    ``baseline(e)`` (when given), so each ratio compares runs that saw the same machine state;
    each timed call follows an untimed one of the same function (:func:`_timed`).
    ``kwargs``: the loss's keyword arguments; arrays among them (a memory) are passed to the
    jitted step as arguments, strings and numbers are fixed. Returns the three lists of
    seconds (the last empty without ``baseline``)."""
    # As in training: closed over, XLA would fold what depends on the arrays alone (the
    # memory's label sort and its [M, D] gather) into constants.
    static = {k: v for k, v in kwargs.items() if isinstance(v, (str, int, float, bool))}
    traced = {k: v for k, v in kwargs.items() if k not in static}
    args = ((e, y) if params is None else (e, y, params)) + (traced,)
    step = jax.jit(jax.value_and_grad(lambda *a: fn(*a[:-1], **a[-1], **static),
                                      argnums=0 if params is None else (0, 2)))
    cols = e if floor_cols is None else floor_cols
    floor, floor_args = (pair_floor, (e, cols)) if params is None else (class_floor, (e, params))
    value, grad = step(*args)
    jax.block_until_ready((grad, floor(*floor_args)))
    if baseline is not None:
        jax.block_until_ready(baseline(e))

    def block(n: int) -> tuple[list, list, list]:
        warm_up(lambda: step(*args), lambda: floor(*floor_args),
                *([lambda: baseline(e)] if baseline is not None else []))
        times, floors, bases = [], [], []
        for _ in range(n):
            times.append(_timed(step, *args))
            floors.append(_timed(floor, *floor_args))
            if baseline is not None:
                bases.append(_timed(baseline, e))
        return times, floors, bases

    return float(value), block


def torch_timer(loss_obj, miner, e_np: np.ndarray, y_np: np.ndarray
                ) -> tuple[float, Callable[[int], list], float]:
    """The value of a pytorch-metric-learning loss, a block timer of its forward+backward
    (``block(n)`` returns ``n`` times in seconds) and the seconds of one warm call (from which
    :func:`peer_calls` sizes the blocks)."""
    import torch

    y = torch.from_numpy(y_np.astype(np.int64))

    def run():
        e = torch.from_numpy(e_np).requires_grad_(True)
        pairs = miner(e, y) if miner is not None else None
        loss = loss_obj(e, y, pairs) if pairs is not None else loss_obj(e, y)
        loss.backward()
        return float(loss.detach())

    value = run()
    t = time.perf_counter()
    run()
    warm_call = time.perf_counter() - t

    def block(n: int) -> list:
        warm_up(run)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        return times

    return value, block, warm_call


# A peer call under this many seconds is timed as often as the loss; slower ones (PML's
# all-triplet and semi-hard rows: ~0.5 s) a third as often, to keep the run short.
_CHEAP_PEER_S = 0.1


def peer_calls(repeats: int, warm_call: float) -> int:
    """How many calls of a peer to time, from the loss's ``repeats`` and one warm peer call's
    seconds: ``repeats`` for a cheap peer, else a third of them (at least 3)."""
    return repeats if warm_call < _CHEAP_PEER_S else max(3, repeats // 3)


def measure(jax_block: Callable, repeats: int, peer_block: Callable | None = None,
            peer_repeats: int = 0) -> tuple[float, float, float | None, float | None]:
    """``(loss, floor, baseline or None, peer or None)`` in seconds over :data:`ROUNDS` rounds
    of a JAX block and a peer block (``repeats`` and ``peer_repeats`` calls in all): the
    median of the loss's times; the floor and baseline as the loss's median over the median of
    the paired ratios (each loss call over the floor / baseline call right after it), so that
    ``loss / floor`` is that median ratio; and the peer as the loss's median times the median
    over the rounds of the peer's median over the loss's in that round (adjacent blocks), so
    that ``peer / loss`` is that median ratio. A ratio of two separate medians moved by a third
    between runs on a shared VM (the triplet all row: 1.25-1.65x the floor, while its ratio to
    the contrastive baseline stayed at 1.24-1.29): a slow phase shorter than the run moves one
    median and not the other, where each pair (round) saw about the same phase."""
    times, floors, bases, round_ratios = [], [], [], []
    for _ in range(ROUNDS):
        t, f, b = jax_block(-(-repeats // ROUNDS))
        times += t
        floors += f
        bases += b
        if peer_block is not None:
            p = peer_block(-(-peer_repeats // ROUNDS))
            round_ratios.append(statistics.median(p) / statistics.median(t))
    loss = statistics.median(times)

    def paired(others: list) -> float:
        return loss / statistics.median([t / o for t, o in zip(times, others, strict=True)])

    return (loss, paired(floors), paired(bases) if bases else None,
            loss * statistics.median(round_ratios) if round_ratios else None)


def peers():
    """name -> (dml_jax fn(e, y), (pml loss, pml miner) or None, values comparable?)."""
    try:
        from pytorch_metric_learning import distances as pd
        from pytorch_metric_learning import losses as pl
        from pytorch_metric_learning import miners as pm
        from pytorch_metric_learning import reducers as pr
    except ImportError:
        pl = None
    euclid = (lambda: pd.LpDistance(normalize_embeddings=False)) if pl else None
    mean = (lambda: pr.MeanReducer()) if pl else None

    table = {
        "contrastive": (
            lambda e, y: losses.contrastive_loss(e, y),
            (lambda: (pl.ContrastiveLoss(0.0, 1.0, distance=euclid(), reducer=mean()), None)),
            True,
        ),
        "triplet_all": (
            lambda e, y: losses.triplet_loss(e, y, mining="all"),
            (lambda: (pl.TripletMarginLoss(0.2, distance=euclid(), reducer=mean()), None)),
            True,
        ),
        "triplet_batch_hard": (
            lambda e, y: losses.triplet_loss(e, y, mining="batch_hard"),
            (lambda: (pl.TripletMarginLoss(0.2, distance=euclid(), reducer=mean()),
                      pm.BatchHardMiner(distance=euclid()))),
            True,
        ),
        "triplet_semi_hard": (
            lambda e, y: losses.triplet_loss(e, y, mining="semi_hard"),
            # PML's semi-hard miner keeps every semi-hard triplet (a different rule): speed only.
            (lambda: (pl.TripletMarginLoss(0.2, distance=euclid(), reducer=mean()),
                      pm.TripletMarginMiner(0.2, distance=euclid(), type_of_triplets="semihard"))),
            False,
        ),
        "lifted_structure": (
            lambda e, y: losses.lifted_structure_loss(e, y),
            # PML's LiftedStructureLoss averages a per-pair softplus form: speed only.
            (lambda: (pl.LiftedStructureLoss(neg_margin=1.0, pos_margin=0.0, distance=euclid()),
                      None)),
            False,
        ),
        "multi_similarity": (
            lambda e, y: losses.multi_similarity_loss(e, y),
            (lambda: (pl.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5), None)),
            True,
        ),
    }
    if hasattr(losses, "ranked_list_loss"):
        table["ranked_list"] = (
            lambda e, y: losses.ranked_list_loss(e, y),
            # PML lets gradients flow through the weights and normalises: speed only.
            (lambda: (pl.RankedListLoss(margin=0.4, Tn=10.0, alpha=1.2, Tp=0.0), None)),
            False,
        )
    try:
        from benchmarks.losses_seed import SEED_LOSSES
    except ImportError:
        SEED_LOSSES = {}
    for name, fn in SEED_LOSSES.items():
        table.setdefault(name, (fn, None, False))
    if pl is None:
        table = {k: (fn, None, False) for k, (fn, _, _) in table.items()}
    return table


def proxy_rows(args, e_np: np.ndarray, y_np: np.ndarray, baseline: Callable):
    """Rows of the proxy / margin-softmax / pair-softmax losses, on a shared parameter array.

    Yields ``(name, t_jax, t_peer or None, v_jax, v_peer or None, t_floor, t_baseline)``.
    """
    from benchmarks.losses_proxy import PROXY_LOSSES

    num_classes = int(y_np.max()) + 1
    rng = np.random.default_rng(1)
    e, y = jnp.asarray(e_np), jnp.asarray(y_np)
    for name, (fn, make_peer, rows) in PROXY_LOSSES.items():
        if args.only and name not in args.only:
            continue
        p_np = rng.normal(size=(num_classes * max(rows, 1), args.dim)).astype(np.float32)
        if rows:  # the loss differentiates its parameters too; its floor is class_floor
            v_jax, jax_block = jax_timer(fn, e, y, jnp.asarray(p_np), baseline=baseline)
        else:  # a pair loss (SupCon, Circle): the pair floor
            v_jax, jax_block = jax_timer(functools.partial(fn, p=None), e, y, baseline=baseline)
        v_peer = peer_block = None
        warm_call = 0.0
        try:
            import torch

            loss_obj, attr, transposed = make_peer(num_classes, args.dim)
        except ImportError:
            loss_obj = None
        if loss_obj is not None:
            if attr is not None:
                with torch.no_grad():
                    getattr(loss_obj, attr).copy_(torch.from_numpy(p_np.T.copy() if transposed
                                                                   else p_np))
            v_peer, peer_block, warm_call = torch_timer(loss_obj, None, e_np, y_np)
        t_jax, t_floor, t_base, t_peer = measure(
            jax_block, args.repeats, peer_block,
            peer_calls(args.repeats, warm_call),
        )
        yield name, t_jax, t_peer, v_jax, v_peer, t_floor, t_base


def print_row(name: str, t_jax: float, t_peer: float | None, v_jax: float,
              v_peer: float | None, floor: float, t_contr: float, failure: str = "-") -> None:
    """One table row: times in seconds; ``v_peer`` None where the values are not comparable;
    ``failure`` shown in the peer column when there is no peer time."""
    speedup = agree = "-"
    if t_peer is None:
        peer_ms = failure
    else:
        ratio = t_peer / t_jax  # two decimals where the 2x goal is decided
        peer_ms, speedup = f"{t_peer * 1e3:.1f}", f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.1f}x"
        if v_peer is not None:
            agree = "same" if abs(v_peer - v_jax) <= 1e-4 * max(1.0, abs(v_jax)) else (
                f"{v_jax:.4g}/{v_peer:.4g}")
    print(f"{name:<{NAME_WIDTH}}{t_jax * 1e3:>11.1f}{peer_ms:>10}{speedup:>10}"
          f"{t_jax / floor:>9.2f}{t_jax / t_contr:>9.2f}{agree:>10}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--only", nargs="*", default=None, help="loss names to run")
    parser.add_argument("--memory", type=int, default=8192,
                        help="cross-batch memory size for the XBM rows (0: skip them)")
    parser.add_argument("--allocator", choices=("retain", "default"), default="retain",
                        help="retain: glibc keeps freed memory (dml_jax.host_memory, as the "
                             "experiment scripts do), so per-call buffers do not page-fault; "
                             "default: glibc's own settings")
    args = parser.parse_args()
    # Before JAX (or torch) starts its threads; it applies to both sides of every ratio.
    retained = args.allocator == "retain" and host_memory.retain_freed_memory()

    rng = np.random.default_rng(0)
    e_np = rng.normal(size=(args.batch, args.dim)).astype(np.float32)
    e_np /= np.linalg.norm(e_np, axis=1, keepdims=True)
    y_np = np.repeat(np.arange(args.batch // args.per_class), args.per_class).astype(np.int32)
    y_np = y_np[rng.permutation(args.batch)]
    e, y = jnp.asarray(e_np), jnp.asarray(y_np)
    y_pairs = jnp.repeat(jnp.arange(args.batch // 2, dtype=jnp.int32), 2)

    contrastive = {  # jitted contrastive steps, timed alternately with each loss
        layout: jax.jit(jax.value_and_grad(lambda e, y=labels: losses.contrastive_loss(e, y)))
        for layout, labels in (("pk", y), ("pairs", y_pairs))
    }
    try:
        import torch

        torch_info = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    except ImportError:
        torch_info = "torch not installed"
    print(f"# {cpu_description()}, {os.cpu_count()} cores; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}; {torch_info}; host memory: "
          f"{'retained (dml_jax.host_memory)' if retained else 'default allocator settings'}")
    print(f"# B={args.batch}, D={args.dim}, {args.per_class} per class; median of "
          f"{args.repeats} (a peer slower than {_CHEAP_PEER_S:g} s per call: of "
          f"{peer_calls(args.repeats, _CHEAP_PEER_S)}); x floor = median over calls of loss / "
          "the floor's call right after it (e @ e.T and one [B, B] @ [B, D], jitted; for the "
          "losses on class parameters p [C, D]: e @ p.T and the two backward products); "
          "x contr. likewise")
    print(f"{'loss':<{NAME_WIDTH}}{'dml_jax ms':>11}{'peer ms':>10}{'speed-up':>10}{'x floor':>9}"
          f"{'x contr.':>9}{'values':>10}")
    for name, (fn, peer, comparable) in peers().items():
        if args.only and name not in args.only:
            continue
        layout = "pairs" if name.startswith(PAIR_LAYOUT) else "pk"
        v_jax, jax_block = jax_timer(
            fn, e, y_pairs if layout == "pairs" else y, baseline=contrastive[layout]
        )
        peer_block = v_peer = None
        warm_call = 0.0
        failure = "-"
        if peer is not None:
            loss_obj, miner = peer()
            try:
                v_peer, peer_block, warm_call = torch_timer(loss_obj, miner, e_np, y_np)
            except (RuntimeError, MemoryError) as err:  # e.g. PML's lifted: B^3 memory
                failure = "OOM" if "memory" in str(err).lower() else "error"
        t_jax, floor, t_contr, t_peer = measure(
            jax_block, args.repeats, peer_block,
            peer_calls(args.repeats, warm_call),
        )
        name_shown = f"{name} (pairs)" if layout == "pairs" else name
        print_row(name_shown, t_jax, t_peer, v_jax, v_peer if comparable else None, floor,
                  t_contr, failure)
    for name, t_jax, t_peer, v_jax, v_peer, floor, t_contr in proxy_rows(
        args, e_np, y_np, contrastive["pk"]
    ):
        print_row(name, t_jax, t_peer, v_jax, v_peer, floor, t_contr)
    if args.memory:
        memory_rows(args, e, y)


MEMORY_LOSSES = {
    "contrastive": (losses.contrastive_loss, {}),
    "triplet, all": (losses.triplet_loss, {"mining": "all"}),
    "triplet, batch-hard": (losses.triplet_loss, {"mining": "batch_hard"}),
    "triplet, semi-hard": (losses.triplet_loss, {"mining": "semi_hard"}),
    "multi-similarity": (losses.multi_similarity_loss, {}),
    "ranked list": (losses.ranked_list_loss, {}),
}


def memory_rows(args, e: jax.Array, y: jax.Array) -> None:
    """Each memory-enabled loss with a full memory of ``args.memory`` rows (labels from the
    batch's classes), against the floor of its ``[B, B + M]`` products."""
    rng = np.random.default_rng(2)
    m = args.memory
    mem_e = rng.normal(size=(m, args.dim)).astype(np.float32)
    mem_e /= np.linalg.norm(mem_e, axis=1, keepdims=True)
    state = losses.xbm_update(losses.xbm_init(m, args.dim), jnp.asarray(mem_e),
                              jnp.asarray(rng.choice(np.asarray(y), size=m)))
    cols = jnp.concatenate([e, state.embeddings])
    print(f"# with a full cross-batch memory of M = {m}: x floor = median over calls of loss / "
          "the floor's call right after it (e @ [e; memory].T and one [B, B + M] @ [B + M, D])")
    for name, (fn, kwargs) in MEMORY_LOSSES.items():
        t_jax, floor, _, _ = measure(
            jax_timer(fn, e, y, floor_cols=cols, memory=state, **kwargs)[1], args.repeats
        )
        print(f"{name + ' + XBM':<{NAME_WIDTH}}{t_jax * 1e3:>11.1f}{'-':>10}{'-':>10}"
              f"{t_jax / floor:>9.2f}{'-':>9}{'-':>10}")


if __name__ == "__main__":
    main()
