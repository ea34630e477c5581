"""BN-Inception: equivalence of the NNX port with Cadene's ``bninception`` and its converter.

The torch reference below is written from the layer list of ``pretrainedmodels``'
``bninception`` (same flat module names, so the same state-dict keys, and the same quirks:
conv biases, BatchNorm ``momentum=0.9``, ceil-mode pools, count_include_pad average pools, a
max-pool branch in 5b); ``pretrainedmodels`` itself is not needed.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="conversion tests need the convert extra (torch)")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from dml_jax.models.bninception import (  # noqa: E402
    BGR_MEAN,
    BNInception,
    bninception_from_torch,
    rgb_to_bninception_input,
)
from tests.models.torch_helpers import features, np_state, randomise, rel_err  # noqa: E402

tnn = torch.nn
F = torch.nn.functional

# block -> (in, 1x1, 3x3 reduce, 3x3, double reduce, double, pool proj, pool kind)
_TABLE = [
    ("inception_3a", 192, 64, 64, 64, 64, 96, 32, "avg"),
    ("inception_3b", 256, 64, 64, 96, 64, 96, 64, "avg"),
    ("inception_3c", 320, 0, 128, 160, 64, 96, 0, "stride2"),
    ("inception_4a", 576, 224, 64, 96, 96, 128, 128, "avg"),
    ("inception_4b", 576, 192, 96, 128, 96, 128, 128, "avg"),
    ("inception_4c", 576, 160, 128, 160, 128, 160, 128, "avg"),
    ("inception_4d", 608, 96, 128, 192, 160, 192, 128, "avg"),
    ("inception_4e", 608, 0, 128, 192, 192, 256, 0, "stride2"),
    ("inception_5a", 1056, 352, 192, 320, 160, 224, 128, "avg"),
    ("inception_5b", 1024, 352, 192, 320, 192, 224, 128, "max"),
]


class TorchBNInception(tnn.Module):
    """Cadene's flat BN-Inception layout; ``forward`` returns the ``inception_5b`` map."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._units: list[str] = []
        self._add("conv1_7x7_s2", 3, 64, 7, 2, 3)
        self.pool1_3x3_s2 = tnn.MaxPool2d(3, stride=2, ceil_mode=True)
        self._add("conv2_3x3_reduce", 64, 64, 1)
        self._add("conv2_3x3", 64, 192, 3, 1, 1)
        self.pool2_3x3_s2 = tnn.MaxPool2d(3, stride=2, ceil_mode=True)
        for name, cin, c1, c3r, c3, cdr, cd, cp, kind in _TABLE:
            s = 2 if kind == "stride2" else 1
            if c1:
                self._add(f"{name}_1x1", cin, c1, 1)
            self._add(f"{name}_3x3_reduce", cin, c3r, 1)
            self._add(f"{name}_3x3", c3r, c3, 3, s, 1)
            self._add(f"{name}_double_3x3_reduce", cin, cdr, 1)
            self._add(f"{name}_double_3x3_1", cdr, cd, 3, 1, 1)
            self._add(f"{name}_double_3x3_2", cd, cd, 3, s, 1)
            if kind == "avg":
                pool = tnn.AvgPool2d(3, stride=1, padding=1, ceil_mode=True, count_include_pad=True)
            elif kind == "max":
                pool = tnn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True)
            else:
                pool = tnn.MaxPool2d(3, stride=2, ceil_mode=True)
            setattr(self, f"{name}_pool", pool)
            if cp:
                self._add(f"{name}_pool_proj", cin, cp, 1)
        self.global_pool = tnn.AvgPool2d(7, stride=1, padding=0, ceil_mode=True)
        self.last_linear = tnn.Linear(1024, num_classes)

    def _add(self, name: str, cin: int, cout: int, k: int, stride: int = 1, pad: int = 0):
        setattr(self, name, tnn.Conv2d(cin, cout, k, stride=stride, padding=pad))
        setattr(self, f"{name}_bn", tnn.BatchNorm2d(cout, eps=1e-5, momentum=0.9))

    def _u(self, name: str, x):
        return F.relu(getattr(self, f"{name}_bn")(getattr(self, name)(x)))

    def forward(self, x, taps: dict | None = None):
        x = self.pool1_3x3_s2(self._u("conv1_7x7_s2", x))
        x = self._u("conv2_3x3", self._u("conv2_3x3_reduce", x))
        x = self.pool2_3x3_s2(x)
        for name, _, c1, _, _, _, _, cp, _ in _TABLE:
            outs = [self._u(f"{name}_1x1", x)] if c1 else []
            outs.append(self._u(f"{name}_3x3", self._u(f"{name}_3x3_reduce", x)))
            d = self._u(f"{name}_double_3x3_reduce", x)
            outs.append(self._u(f"{name}_double_3x3_2", self._u(f"{name}_double_3x3_1", d)))
            p = getattr(self, f"{name}_pool")(x)
            outs.append(self._u(f"{name}_pool_proj", p) if cp else p)
            x = torch.cat(outs, 1)
            if taps is not None:
                taps[name] = x.detach().numpy().copy()
        return x






@pytest.fixture(scope="module")
def reference() -> TorchBNInception:
    torch.manual_seed(0)
    return randomise(TorchBNInception(), seed=1).eval()




def _images(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """NCHW float32, on the scale of mean-subtracted 0-255 pixels."""
    return 50.0 * np.random.default_rng(seed).standard_normal(shape).astype(np.float32)




@pytest.mark.slow
def test_eval_features_match_torch(reference):
    # 64 x 96 (non-square): even map sizes at 3c/4e, ceil-mode overhang in pool1.
    x = _images((2, 3, 64, 96), seed=3)
    taps: dict[str, np.ndarray] = {}
    with torch.no_grad():
        fmap = reference(torch.from_numpy(x), taps)
    want = fmap.mean(dim=(2, 3)).numpy()
    model = bninception_from_torch(np_state(reference))
    feats = features(model, jnp.asarray(x.transpose(0, 2, 3, 1)))
    got = np.asarray(feats["pooled"])
    assert got.shape == (2, 1024) and model.num_features == 1024
    assert rel_err(got, want) < 1e-4, rel_err(got, want)
    for name in ("inception_3c", "inception_4e", "inception_5b"):
        mid = np.asarray(feats[name]).transpose(0, 3, 1, 2)
        assert mid.shape == taps[name].shape, name
        assert rel_err(mid, taps[name]) < 1e-4, (name, rel_err(mid, taps[name]))


def test_global_pool_equals_cadene_at_7x7(reference):
    # Cadene's global_pool is AvgPool2d(7): the spatial mean used here when the map is 7x7.
    fmap = torch.randn(2, 1024, 7, 7)
    np.testing.assert_allclose(
        reference.global_pool(fmap).flatten(1).numpy(), fmap.mean(dim=(2, 3)).numpy(), atol=1e-5
    )


@pytest.mark.slow
def test_train_mode_updates_running_stats_like_torch():
    ref = randomise(TorchBNInception(), seed=7)
    model = bninception_from_torch(np_state(ref))
    x = _images((4, 3, 64, 64), seed=4)
    ref.train()
    model.train()
    old = np_state(ref)
    taps: dict[str, np.ndarray] = {}
    with torch.no_grad():
        want = ref(torch.from_numpy(x), taps).mean(dim=(2, 3)).numpy()
    feats = features(model, jnp.asarray(x.transpose(0, 2, 3, 1)))
    mid = np.asarray(feats["inception_4e"]).transpose(0, 3, 1, 2)
    assert rel_err(mid, taps["inception_4e"]) < 1e-4
    # Batch statistics over only 4 x 2 x 2 values in stage 5 amplify float32 rounding
    # (measured 7.7e-5 with this batch of 4), hence the looser bound at the end.
    assert rel_err(np.asarray(feats["pooled"]), want) < 2e-4
    new = np_state(ref)
    for name in ("conv1_7x7_s2", "inception_3c_3x3", "inception_5b_pool_proj"):
        bn = getattr(model, name).bn
        np.testing.assert_allclose(
            np.asarray(bn.mean[...]), new[f"{name}_bn.running_mean"], rtol=1e-4, atol=1e-4
        )
        # The running variance takes the unbiased batch variance, as torch's does.
        assert not np.allclose(new[f"{name}_bn.running_var"], old[f"{name}_bn.running_var"])
        np.testing.assert_allclose(
            np.asarray(bn.var[...]), new[f"{name}_bn.running_var"], rtol=1e-4, atol=1e-4
        )


def test_parameter_count():
    ref = TorchBNInception()
    torch_params = sum(p.numel() for p in ref.parameters())
    print(f"BN-Inception parameters incl. 1000-class last_linear: {torch_params:,}")
    assert 11.2e6 < torch_params < 11.4e6  # "~11.3M" for BN-Inception
    model = nnx.eval_shape(lambda: BNInception(rngs=nnx.Rngs(0)))
    nnx_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert nnx_params + 1024 * 1000 + 1000 == torch_params
    assert sum(1 for k in ref.state_dict() if k.endswith("_bn.running_var")) == len(
        model.unit_names
    )


def test_random_init_and_preprocess():
    model = BNInception(rngs=nnx.Rngs(2))
    w = np.asarray(model.inception_4a_3x3.conv.kernel[...])
    bound = 1 / np.sqrt(3 * 3 * 64)
    assert np.abs(w).max() <= bound and w.std() > 0.5 * bound
    rgb = np.random.default_rng(0).uniform(size=(2, 64, 64, 3)).astype(np.float32)
    x = rgb_to_bninception_input(jnp.asarray(rgb))
    np.testing.assert_allclose(np.asarray(x)[..., 0], 255 * rgb[..., 2] - BGR_MEAN[0], rtol=1e-6)
    model.eval()
    out = nnx.eval_shape(lambda m, x: m(x), model, x)
    assert out.shape == (2, 1024)
    feats = nnx.eval_shape(lambda m, x: m.features(x), model, x)
    assert feats["inception_3c"].shape == (2, 4, 4, 576)
    assert feats["inception_4e"].shape == (2, 2, 2, 1056)


def test_odd_map_size_is_rejected_with_a_clear_error():
    model = nnx.eval_shape(lambda: BNInception(rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="inception_3c"):
        nnx.eval_shape(lambda m, x: m(x), model, jnp.zeros((1, 72, 72, 3)))


def test_missing_key_is_named(reference):
    state = np_state(reference)
    del state["inception_4e_double_3x3_1_bn.running_mean"]
    with pytest.raises(KeyError, match=re.escape("inception_4e_double_3x3_1_bn.running_mean")):
        bninception_from_torch(state)


def test_unexpected_key_is_named(reference):
    state = np_state(reference)
    state["inception_3c_1x1.weight"] = np.zeros((64, 320, 1, 1), np.float32)
    with pytest.raises(ValueError, match=re.escape("inception_3c_1x1.weight")):
        bninception_from_torch(state)


def test_misshaped_key_is_named(reference):
    state = np_state(reference)
    state["inception_5b_pool_proj.bias"] = np.zeros((64,), np.float32)
    with pytest.raises(ValueError, match=re.escape("inception_5b_pool_proj.bias")):
        bninception_from_torch(state)


def test_classifier_keys_are_ignored_and_pth_files_load(reference, tmp_path):
    state = reference.state_dict()
    assert "last_linear.weight" in state
    torch.save(state, tmp_path / "bninception.pth")
    model = bninception_from_torch(tmp_path / "bninception.pth")
    np.testing.assert_array_equal(
        np.asarray(model.inception_4d_pool_proj.conv.bias[...]),
        state["inception_4d_pool_proj.bias"].numpy(),
    )
    np.testing.assert_array_equal(
        np.asarray(model.inception_4d_pool_proj.bn.var[...]),
        state["inception_4d_pool_proj_bn.running_var"].numpy(),
    )
