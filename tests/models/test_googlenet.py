"""GoogLeNet: torchvision-equivalence of the NNX port and its state-dict converter.

The torch reference below is written from the torchvision architecture (same module tree, so
the same state-dict keys); torchvision itself is not needed.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="conversion tests need the convert extra (torch)")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from dml_jax.models.googlenet import (  # noqa: E402
    GoogLeNet,
    avg_pool2d_torch,
    googlenet_from_torch,
    max_pool2d_torch,
)
from tests.models.torch_helpers import features, np_state, randomise, rel_err  # noqa: E402

tnn = torch.nn
F = torch.nn.functional

# --------------------------------------------------------------------------------------------
# torch reference (torchvision's module tree and key names)
# --------------------------------------------------------------------------------------------


class _TBasicConv(tnn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = tnn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=False)
        self.bn = tnn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class _TInception(tnn.Module):
    def __init__(self, cin, c1, c3r, c3, c5r, c5, cp):
        super().__init__()
        self.branch1 = _TBasicConv(cin, c1, 1)
        self.branch2 = tnn.Sequential(_TBasicConv(cin, c3r, 1), _TBasicConv(c3r, c3, 3, padding=1))
        # torchvision's "5x5" branch really has a 3x3 kernel.
        self.branch3 = tnn.Sequential(_TBasicConv(cin, c5r, 1), _TBasicConv(c5r, c5, 3, padding=1))
        self.branch4 = tnn.Sequential(
            tnn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True), _TBasicConv(cin, cp, 1)
        )

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class _TAux(tnn.Module):
    def __init__(self, cin: int, num_classes: int):
        super().__init__()
        self.conv = _TBasicConv(cin, 128, 1)
        self.fc1 = tnn.Linear(2048, 1024)
        self.fc2 = tnn.Linear(1024, num_classes)


class TorchGoogLeNet(tnn.Module):
    """torchvision ``GoogLeNet`` layout; ``forward`` returns the pooled 1024-d features."""

    def __init__(self, num_classes: int = 1000, aux_logits: bool = True, transform_input=False):
        super().__init__()
        self.transform_input = transform_input
        self.conv1 = _TBasicConv(3, 64, 7, stride=2, padding=3)
        self.maxpool1 = tnn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = _TBasicConv(64, 64, 1)
        self.conv3 = _TBasicConv(64, 192, 3, padding=1)
        self.maxpool2 = tnn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception3a = _TInception(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = _TInception(256, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = tnn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception4a = _TInception(480, 192, 96, 208, 16, 48, 64)
        self.inception4b = _TInception(512, 160, 112, 224, 24, 64, 64)
        self.inception4c = _TInception(512, 128, 128, 256, 24, 64, 64)
        self.inception4d = _TInception(512, 112, 144, 288, 32, 64, 64)
        self.inception4e = _TInception(528, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = tnn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.inception5a = _TInception(832, 256, 160, 320, 32, 128, 128)
        self.inception5b = _TInception(832, 384, 192, 384, 48, 128, 128)
        if aux_logits:
            self.aux1 = _TAux(512, num_classes)
            self.aux2 = _TAux(528, num_classes)
        self.avgpool = tnn.AdaptiveAvgPool2d((1, 1))
        self.dropout = tnn.Dropout(0.2)
        self.fc = tnn.Linear(1024, num_classes)

    def forward(self, x):
        if self.transform_input:
            mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
            x = torch.cat(
                [x[:, c : c + 1] * (std[c] / 0.5) + (mean[c] - 0.5) / 0.5 for c in range(3)], 1
            )
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        for name in ("inception4a", "inception4b", "inception4c", "inception4d", "inception4e"):
            x = getattr(self, name)(x)
        x = self.inception5b(self.inception5a(self.maxpool4(x)))
        return torch.flatten(self.avgpool(x), 1)






@pytest.fixture(scope="module")
def reference() -> TorchGoogLeNet:
    torch.manual_seed(0)
    return randomise(TorchGoogLeNet(), seed=1).eval()




def _images(shape: tuple[int, int, int, int], seed: int) -> np.ndarray:
    """NCHW float32 images, roughly ImageNet-normalised."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)




# --------------------------------------------------------------------------------------------
# pooling helpers against torch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [8, 9])  # both parities: with and without overhang
@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "ceil_mode"),
    [(3, 2, 0, True), (3, 2, 0, False), (2, 2, 0, True), (3, 1, 1, True), (3, 2, 1, True)],
)
def test_pool_helpers_match_torch(size, kernel, stride, padding, ceil_mode):
    x = _images((2, 3, size, size + 1), seed=size)
    xt = torch.from_numpy(x)
    xj = jnp.asarray(x.transpose(0, 2, 3, 1))
    want = F.max_pool2d(xt, kernel, stride, padding, ceil_mode=ceil_mode).numpy()
    got = np.asarray(max_pool2d_torch(xj, kernel, stride, padding, ceil_mode))
    np.testing.assert_allclose(got.transpose(0, 3, 1, 2), want, rtol=0, atol=0)
    for include in (True, False):
        want = F.avg_pool2d(xt, kernel, stride, padding, ceil_mode, count_include_pad=include)
        got = np.asarray(avg_pool2d_torch(xj, kernel, stride, padding, ceil_mode, include))
        np.testing.assert_allclose(got.transpose(0, 3, 1, 2), want.numpy(), atol=1e-6)


# --------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_features_match_torch(reference):
    # transform_input=True covers the whole network plus torchvision's input re-normalisation
    # (without it the module is the same minus that affine map); one compile keeps this fast.
    transform_input = True
    # 67 x 80: odd / non-multiple-of-32 sizes exercise the ceil-mode pools.
    x = _images((2, 3, 67, 80), seed=3)
    captured = {}
    hook = reference.inception4e.register_forward_hook(
        lambda mod, inp, out: captured.__setitem__("inception4e", out.detach().numpy())
    )
    reference.transform_input = transform_input
    try:
        with torch.no_grad():
            want = reference(torch.from_numpy(x)).numpy()
    finally:
        hook.remove()
        reference.transform_input = False
    model = googlenet_from_torch(np_state(reference), transform_input=transform_input)
    feats = features(model, jnp.asarray(x.transpose(0, 2, 3, 1)))
    got = np.asarray(feats["pooled"])
    assert got.shape == (2, 1024) and model.num_features == 1024
    assert rel_err(got, want) < 1e-4, rel_err(got, want)
    mid = np.asarray(feats["inception4e"]).transpose(0, 3, 1, 2)
    assert mid.shape == captured["inception4e"].shape
    assert rel_err(mid, captured["inception4e"]) < 1e-4


@pytest.mark.slow
def test_train_mode_updates_running_stats_like_torch(reference):
    ref = randomise(TorchGoogLeNet(aux_logits=False), seed=7)
    model = googlenet_from_torch(np_state(ref))
    x = _images((4, 3, 64, 64), seed=4)
    ref.train()
    model.train()
    old = np_state(ref)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    got = np.asarray(features(model, jnp.asarray(x.transpose(0, 2, 3, 1)))["pooled"])
    assert rel_err(got, want) < 1e-4
    new = np_state(ref)
    layers = [  # (torch prefix, nnx BatchNorm)
        ("conv1.bn", model.conv1.bn),
        ("inception3a.branch2.1.bn", model.inception3a.branch2[1].bn),
        ("inception5b.branch4.1.bn", model.inception5b.branch4.bn),
    ]
    for prefix, bn in layers:
        np.testing.assert_allclose(
            np.asarray(bn.mean[...]), new[f"{prefix}.running_mean"], rtol=1e-4, atol=1e-5
        )
        # The running variance takes the unbiased batch variance, as torch's does.
        assert not np.allclose(new[f"{prefix}.running_var"], old[f"{prefix}.running_var"])
        np.testing.assert_allclose(
            np.asarray(bn.var[...]), new[f"{prefix}.running_var"], rtol=1e-4, atol=1e-5
        )


def test_parameter_count_matches_torchvision():
    ref = TorchGoogLeNet(aux_logits=False)
    torch_params = sum(p.numel() for p in ref.parameters())
    assert torch_params == 6_624_904  # torchvision's published figure for googlenet
    model = nnx.eval_shape(lambda: GoogLeNet(rngs=nnx.Rngs(0)))
    nnx_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    fc = 1024 * 1000 + 1000
    assert nnx_params + fc == torch_params
    stats = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.BatchStat)))
    torch_stats = sum(
        v.numel()
        for k, v in ref.state_dict().items()
        if k.endswith(("running_mean", "running_var"))
    )
    assert stats == torch_stats


def test_random_init_model_runs():
    model = GoogLeNet(rngs=nnx.Rngs(1))
    w = np.asarray(model.inception4a.branch2[1].conv.kernel[...])
    assert 0.008 < w.std() < 0.0095 and np.abs(w).max() <= 0.02  # truncated normal(0.01)
    x = jnp.asarray(_images((2, 32, 32, 3), seed=5))
    model.eval()
    # Shapes only (abstract evaluation): a real forward of this graph is tested above.
    feats = nnx.eval_shape(lambda m, x: m.features(x), model, x)
    assert feats["pooled"].shape == (2, 1024)
    assert feats["conv3"].shape == (2, 8, 8, 192)
    assert feats["inception4e"].shape == (2, 2, 2, 832)
    assert feats["inception5b"].shape == (2, 1, 1, 1024)
    assert nnx.eval_shape(lambda m, x: m(x), model, x).shape == (2, 1024)


# --------------------------------------------------------------------------------------------
# converter errors
# --------------------------------------------------------------------------------------------


def test_missing_key_is_named(reference):
    state = np_state(reference)
    del state["inception4c.branch2.1.bn.running_var"]
    with pytest.raises(KeyError, match=r"inception4c\.branch2\.1\.bn\.running_var"):
        googlenet_from_torch(state)


def test_unexpected_key_is_named(reference):
    state = np_state(reference)
    state["inception4c.branch5.conv.weight"] = np.zeros((8, 512, 1, 1), np.float32)
    with pytest.raises(ValueError, match=r"inception4c\.branch5\.conv\.weight"):
        googlenet_from_torch(state)


def test_misshaped_key_is_named(reference):
    state = np_state(reference)
    # A true 5x5 kernel in the "5x5" branch (the original paper's shape) is rejected.
    state["inception3a.branch3.1.conv.weight"] = np.zeros((32, 16, 5, 5), np.float32)
    with pytest.raises(ValueError, match=r"inception3a\.branch3\.1\.conv\.weight"):
        googlenet_from_torch(state)


def test_classifier_and_aux_keys_are_ignored(reference):
    state = reference.state_dict()  # torch tensors are accepted as well as arrays
    assert any(k.startswith("aux1.") for k in state) and "fc.weight" in state
    model = googlenet_from_torch(state)
    np.testing.assert_array_equal(
        np.asarray(model.inception3a.branch3[1].conv.kernel[...]),
        state["inception3a.branch3.1.conv.weight"].numpy().transpose(2, 3, 1, 0),
    )
