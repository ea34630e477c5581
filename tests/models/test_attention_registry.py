"""MixedAttention and the registry's lazy dispatch to GoogLeNet / BN-Inception."""

import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dml_jax.models import available_backbones, backbone_from_torch, build_model
from dml_jax.models.attention import MixedAttention


def test_mixed_attention_matches_its_definition():
    att = MixedAttention(32, reduction=4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 32))
    y = nnx.jit(lambda m, x: m(x))(att, x)
    assert y.shape == x.shape
    mlp = lambda v: att.fc2(jax.nn.relu(att.fc1(v)))
    a_c = jax.nn.sigmoid(mlp(x.mean((1, 2))) + mlp(x.max((1, 2))))[:, None, None]
    xc = x * a_c
    s = jnp.stack([xc.mean(-1), xc.max(-1)], -1)
    ref = xc * jax.nn.sigmoid(att.spatial(s))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    assert att.fc1.kernel.shape == (32, 8) and att.spatial.kernel.shape == (7, 7, 2, 1)


def test_attention_after_stage_in_resnet():
    cfg = {"name": "resnet18", "attention_after": ["layer2", "layer4"], "embedding_dim": 8}
    model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    assert model.backbone.attn_layer2.channels == 128
    assert model.backbone.attn_layer4.channels == 512
    emb, aux = nnx.eval_shape(lambda m, x: m(x), model, jnp.zeros((1, 64, 64, 3)))
    assert emb.shape == (1, 8) and aux["features"].shape == (1, 512)
    with pytest.raises(ValueError, match="layer5"):
        build_model(dict(cfg, attention_after=["layer5"]), rngs=nnx.Rngs(0))


def test_resnet_multi_level_head():
    cfg = {"name": "resnet50", "embedding_dim": 512, "multi_level": ["layer2", "layer3", "layer4"]}
    model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    emb, aux = nnx.eval_shape(lambda m, x: m(x), model, jnp.zeros((2, 64, 64, 3)))
    assert emb.shape == (2, 1536) and aux["embedding/layer3"].shape == (2, 512)


def test_registry_lists_all_names():
    names = set(available_backbones())
    expected = {"small_cnn", "resnet18", "resnet34", "resnet50", "resnet101", "googlenet"}
    assert expected | {"bninception", "vit_small_patch16_224", "vit_base_patch16_224"} <= names


def test_lazy_dispatch_to_inception_modules(monkeypatch):
    """backbone_from_torch/build_model reach googlenet.py/bninception.py only when asked."""
    calls = {}

    class Fake(nnx.Module):
        num_features = 4

        def __init__(self, *, rngs=None, **kwargs):
            calls["init"] = kwargs

        def features(self, x):
            return {"pooled": jnp.zeros((x.shape[0], 4))}

        def __call__(self, x):
            return self.features(x)["pooled"]

    def fake_from_torch(state, *, transform_input=False):
        calls["convert"] = (sorted(state), transform_input)
        return Fake()

    g = types.ModuleType("dml_jax.models.googlenet")
    g.GoogLeNet, g.googlenet_from_torch = Fake, fake_from_torch
    b = types.ModuleType("dml_jax.models.bninception")
    b.BNInception, b.bninception_from_torch = Fake, lambda state: Fake()
    monkeypatch.setitem(sys.modules, "dml_jax.models.googlenet", g)
    monkeypatch.setitem(sys.modules, "dml_jax.models.bninception", b)

    m = backbone_from_torch("googlenet", {"w": np.zeros(2)}, transform_input=True)
    assert isinstance(m, Fake) and calls["convert"] == (["w"], True)
    assert isinstance(backbone_from_torch("bninception", {"w": np.zeros(2)}), Fake)
    model = build_model({"name": "bninception", "embedding_dim": 3}, rngs=nnx.Rngs(0))
    emb, aux = model(jnp.zeros((2, 32, 32, 3)))
    assert emb.shape == (2, 3) and aux["features"].shape == (2, 4)
