"""SmallCNN, heads, EmbeddingModel, build_model and frozen BatchNorm (no torch needed)."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dml_jax import models
from dml_jax.models import (
    BatchNorm,
    Classifier,
    EmbeddingHead,
    MultiLevelHead,
    SmallCNN,
    TemporalPooling,
    build_model,
    freeze_batchnorm,
    temporal_average_pool,
)

# One architecture for most tests: eager initialisers compile once per shape (slow on CPU).
CFG = {"name": "small_cnn", "embedding_dim": 16, "num_classes": 4, "head_batchnorm": True}


def _digits(b=64, seed=0):
    return jax.random.uniform(jax.random.key(seed), (b, 8, 8, 1))


def test_small_cnn_shapes():
    m = nnx.eval_shape(lambda: SmallCNN(1, (16, 32, 48), rngs=nnx.Rngs(0)))
    f = nnx.eval_shape(lambda m, x: m.features(x), m, _digits(4))
    assert f["conv1"].shape == (4, 8, 8, 16)
    assert f["conv2"].shape == (4, 4, 4, 32)
    assert f["conv3"].shape == (4, 2, 2, 48)
    assert f["pooled"].shape == (4, 48) and m.num_features == 48


@pytest.mark.parametrize("pooling", ["avg", "max", "avgmax"])
def test_embedding_head(pooling):
    head = EmbeddingHead(8, 4, pooling=pooling, batchnorm=True, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 5, 5, 8))
    e = head(x)
    assert e.shape == (3, 4)
    np.testing.assert_allclose(jnp.linalg.norm(e, axis=-1), 1.0, rtol=1e-5)
    ref = {"avg": x.mean((1, 2)), "max": x.max((1, 2)), "avgmax": x.mean((1, 2)) + x.max((1, 2))}
    np.testing.assert_allclose(head.pool(x), ref[pooling], rtol=1e-6)


def test_embedding_head_no_linear_no_norm():
    head = EmbeddingHead(8, None, l2_normalize=False, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 8))
    np.testing.assert_allclose(head(x), x)
    assert head.embedding_dim == 8


def test_cosine_classifier():
    c = Classifier(4, 3, normalized=True, scale=2.0, rngs=nnx.Rngs(0))
    logits = c(jax.random.normal(jax.random.key(0), (5, 4)))
    assert logits.shape == (5, 3) and float(jnp.abs(logits).max()) <= 2.0 + 1e-5


def test_build_model_small_cnn_contract():
    model = build_model(CFG, rngs=nnx.Rngs(0))
    emb, aux = nnx.jit(lambda m, x: m(x))(model, _digits(6))
    assert emb.shape == (6, 16)
    assert aux["features"].shape == (6, model.num_features)
    assert aux["logits"].shape == (6, 4)
    np.testing.assert_allclose(aux["features"], model.backbone(_digits(6)), rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)


def test_build_model_configdict_and_errors():
    ml_collections = pytest.importorskip("ml_collections")
    cfg = ml_collections.ConfigDict({"name": "small_cnn", "embedding_dim": 16, "pooling": "max"})
    model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    emb, aux = nnx.eval_shape(lambda m, x: m(x), model, _digits(2))
    assert emb.shape == (2, 16) and "logits" not in aux
    with pytest.raises(ValueError, match="resnet50"):
        build_model({"name": "nope"}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="embeding_dim"):
        build_model({"name": "small_cnn", "embeding_dim": 3}, rngs=nnx.Rngs(0))


def test_classifier_on_features_and_multi_level():
    cfg = {
        "name": "small_cnn",
        "embedding_dim": 16,
        "num_classes": 3,
        "classifier_input": "features",
        "multi_level": ["conv1", "conv2"],
        "return_stages": True,
    }
    model = build_model(cfg, rngs=nnx.Rngs(0))
    emb, aux = nnx.jit(lambda m, x: m(x))(model, _digits(2))
    assert emb.shape == (2, 32)
    assert aux["embedding/conv1"].shape == (2, 16) and aux["embedding/conv2"].shape == (2, 16)
    both = jnp.concatenate([aux["embedding/conv1"], aux["embedding/conv2"]], -1)
    np.testing.assert_allclose(emb, both)
    assert aux["logits"].shape == (2, 3)
    assert aux["stage/conv1"].shape == (2, 8, 8, 32)


def test_multi_level_head_missing_stage():
    h = MultiLevelHead({"a": 3}, 2, rngs=nnx.Rngs(0))
    with pytest.raises(KeyError, match="'a'"):
        h({"b": jnp.zeros((1, 2, 2, 3))})


def test_temporal_pooling():
    frames = jnp.arange(12.0).reshape(2, 3, 2)
    np.testing.assert_allclose(temporal_average_pool(frames), frames.mean(1))
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    out = temporal_average_pool(frames, mask)
    np.testing.assert_allclose(out[0], frames[0, :2].mean(0))
    np.testing.assert_allclose(out[1], frames[1, 0])
    model = build_model(CFG, rngs=nnx.Rngs(0))
    model.eval()
    clips = jax.random.uniform(jax.random.key(0), (2, 3, 8, 8, 1))
    fwd = nnx.jit(lambda m, x: m(x))
    set_emb, aux = fwd(TemporalPooling(model), clips)
    assert set_emb.shape == (2, 16) and aux["frame_embeddings"].shape == (2, 3, 16)
    one = fwd(model, clips[1, 2:3])[0][0]
    np.testing.assert_allclose(aux["frame_embeddings"][1, 2], one, rtol=1e-5, atol=1e-6)


def test_batchnorm_unbiased_running_var_like_torch():
    bn = BatchNorm(3, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (4, 2, 2, 3)) * 2.0 + 1.0
    bn.train()
    y = bn(x)
    xn = np.asarray(x).reshape(-1, 3)
    np.testing.assert_allclose(bn.mean[...], 0.1 * xn.mean(0), rtol=1e-5)
    np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * xn.var(0, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(y).reshape(-1, 3), (xn - xn.mean(0)) / np.sqrt(xn.var(0) + 1e-5), atol=1e-5
    )


def _train_step(model, opt, x, y):
    def loss_fn(m):
        _, aux = m(x)
        return optax.softmax_cross_entropy_with_integer_labels(aux["logits"], y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss


def test_freeze_batchnorm_really_freezes():
    model = build_model(dict(CFG, freeze_bn=True), rngs=nnx.Rngs(0))
    # A plain nnx.BatchNorm is frozen too (the generic path used for other engineers' models).
    model.backbone.extra = nnx.BatchNorm(3, rngs=nnx.Rngs(1))
    freeze_batchnorm(model.backbone)
    bn_state = lambda: jax.tree.map(
        np.array, nnx.state(model.backbone, nnx.Any(nnx.BatchStat, models.FrozenParam))
    )
    before = bn_state()
    n_frozen = len(jax.tree.leaves(before))
    assert n_frozen == 4 * 3  # 2 conv BNs + extra: mean, var, scale, bias
    opt = nnx.Optimizer(model, optax.sgd(0.5), wrt=models.trainable_filter())
    model.train()
    step = nnx.jit(_train_step)
    conv_before = np.array(model.backbone.convs[0].kernel[...])
    for _ in range(2):
        step(model, opt, _digits(16), jnp.arange(16) % 4)
    after = bn_state()
    jax.tree.map(np.testing.assert_array_equal, before, after)
    assert not np.allclose(conv_before, model.backbone.convs[0].kernel[...])
    # nnx.view asking for batch statistics is ignored too.
    view = nnx.view(model, use_running_average=False)
    nnx.jit(lambda m, x: m(x))(view, _digits(4))
    jax.tree.map(np.testing.assert_array_equal, before, bn_state())
    # the head's BatchNorm is not frozen by freeze_bn
    assert not models.is_frozen(model.head.linear) and models.is_frozen(model.backbone.bns[0])


def test_unfrozen_batchnorm_updates():
    model = build_model(CFG, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)
    model.train()
    before = np.array(model.backbone.bns[0].mean[...])
    nnx.jit(_train_step)(model, opt, _digits(16), jnp.arange(16) % 4)
    assert not np.allclose(before, model.backbone.bns[0].mean[...])


def test_small_cnn_train_step_is_fast():
    model = build_model(dict(CFG, num_classes=10), rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    model.train()
    graphdef, state = nnx.split((model, opt))

    @jax.jit
    def step(state, x, y):
        m, o = nnx.merge(graphdef, state)
        loss = _train_step(m, o, x, y)
        return loss, nnx.state((m, o))

    x, y = _digits(64), jnp.arange(64) % 10
    loss, state = step(state, x, y)
    jax.block_until_ready(loss)
    t = time.perf_counter()
    for _ in range(20):
        loss, state = step(state, x, y)
    jax.block_until_ready(loss)
    per_step = (time.perf_counter() - t) / 20
    print(f"small_cnn train step (64 digits): {per_step * 1e3:.2f} ms")
    assert per_step < 0.05
