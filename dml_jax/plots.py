"""PNG plots of a run: training curves and a 2-D map of embeddings coloured by class."""

from __future__ import annotations

from dml_jax import _extras

_extras.require("dml_jax.plots", "train", "matplotlib", "sklearn")

from collections.abc import Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finite_or_nan(rows: Sequence[dict[str, float | None]]) -> list[dict[str, float]]:
    """Rows with the ``null`` of a non-finite logged value read back as NaN (a gap)."""
    return [{k: (np.nan if v is None else v) for k, v in r.items() if k != "nonfinite"}
            for r in rows]


def training_curves(rows: Sequence[dict[str, float | None]], path: str) -> None:
    """Loss (train rows) and retrieval metrics (eval rows) against step, saved to ``path``."""
    plt = _pyplot()
    rows = _finite_or_nan(rows)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "map@r" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    if train:
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="total")
        if "metric_loss" in train[0]:
            axes[0].plot([r["step"] for r in train], [r["metric_loss"] for r in train],
                         label="metric loss")
        axes[0].legend()
    axes[0].set(xlabel="step", ylabel="loss", title="training loss")
    for key in ("recall@1", "map@r", "r_precision"):
        if evals and key in evals[0]:
            axes[1].plot([r["step"] for r in evals], [r[key] for r in evals], marker="o",
                         label=key)
    axes[1].set(xlabel="step", ylim=(0, 1.02), title="held-out retrieval")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def embedding_map(embeddings: np.ndarray, labels: np.ndarray, path: str, *, seed: int = 0) -> None:
    """t-SNE of ``embeddings`` ``[N, E]`` coloured by ``labels`` ``[N]``, saved to ``path``."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    plt = _pyplot()
    with threadpool_limits(1):  # t-SNE of a few thousand points: threads only add contention
        xy = TSNE(n_components=2, init="pca", perplexity=min(30.0, (len(labels) - 1) / 3),
                  random_state=seed).fit_transform(np.asarray(embeddings, np.float64))
    fig, ax = plt.subplots(figsize=(5.2, 5))
    scatter = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10", s=8)
    ax.legend(*scatter.legend_elements(), title="class", fontsize=7, loc="best")
    ax.set(title="held-out embeddings (t-SNE)", xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
