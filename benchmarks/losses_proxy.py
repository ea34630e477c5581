"""Proxy, margin-softmax and pair-softmax losses for the loss benchmark (``benchmarks/losses.py``).

``PROXY_LOSSES`` maps a name to ``(fn(e, y, params), make_peer(num_classes, dim), rows per
class)``: the dml_jax loss on a learned ``[C * rows, D]`` parameter array (``rows = 0``: no
parameter, ``params`` ignored), and a factory of the pytorch-metric-learning peer configured to
the same semantics, returning ``(loss object, attribute holding the parameter or None, whether
it is stored transposed)``. Both sides differentiate the embeddings and the parameter array.
"""

from __future__ import annotations

from dml_jax import losses

SOFT_TRIPLE_K = 10


def _pml():
    from pytorch_metric_learning import losses as pl
    from pytorch_metric_learning import reducers as pr

    return pl, pr


def _peer(cls_name: str, attr: str | None, transposed: bool, **kwargs):
    def make(num_classes: int, dim: int):
        pl, pr = _pml()
        cls = getattr(pl, cls_name)
        if attr is None:  # SupCon, Circle: MeanReducer instead of their AvgNonZeroReducer
            return cls(reducer=pr.MeanReducer(), **kwargs), None, False
        return cls(num_classes, dim, **kwargs), attr, transposed

    return make


PROXY_LOSSES = {
    "proxy_anchor": (lambda e, y, p: losses.proxy_anchor_loss(e, y, p),
                     _peer("ProxyAnchorLoss", "proxies", False), 1),
    "proxy_nca": (lambda e, y, p: losses.proxy_nca_loss(e, y, p),
                  _peer("ProxyNCALoss", "proxies", False), 1),
    "arcface": (lambda e, y, p: losses.arcface_loss(e, y, p),
                _peer("ArcFaceLoss", "W", True), 1),
    "cosface": (lambda e, y, p: losses.cosface_loss(e, y, p),
                _peer("CosFaceLoss", "W", True), 1),
    "soft_triple": (lambda e, y, p: losses.soft_triple_loss(
        e, y, p, centers_per_class=SOFT_TRIPLE_K),
                    _peer("SoftTripleLoss", "fc", True, centers_per_class=SOFT_TRIPLE_K),
                    SOFT_TRIPLE_K),
    "supcon": (lambda e, y, p: losses.supcon_loss(e, y), _peer("SupConLoss", None, False), 0),
    "circle": (lambda e, y, p: losses.circle_loss(e, y), _peer("CircleLoss", None, False), 0),
}
