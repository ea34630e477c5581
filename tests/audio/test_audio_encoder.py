"""Audio encoders: registry names, padding invariance, masked pooling."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dml_jax.models import available_backbones, create_backbone
from dml_jax.models.audio_encoder import MaskedPooling, build_audio_encoder, masked_mean


def test_registered_by_name():
    assert {"audio_cnn2d", "audio_tcn1d"} <= set(available_backbones())
    bb = create_backbone("audio_tcn1d", rngs=nnx.Rngs(0), n_mels=20, widths=(8, 12))
    bb.eval()
    assert bb(jnp.zeros((2, 9, 20))).shape == (2, bb.num_features) == (2, 12)
    with pytest.raises(ValueError, match="Unknown audio encoder config keys"):
        build_audio_encoder({"name": "audio_cnn2d", "bogus": 1}, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", ["audio_cnn2d", "audio_tcn1d"])
@pytest.mark.parametrize("pooling", ["mean", "attentive_stats"])
def test_embedding_does_not_depend_on_padding(name, pooling):
    model = build_audio_encoder(
        {"name": name, "n_mels": 16, "widths": (4, 8, 8), "pooling": pooling,
         "embedding_dim": 8, "num_classes": 5}, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 40, 16)).astype(np.float32)
    lengths = np.array([27, 40, 13])  # odd and even: the 2x poolings drop a trailing frame
    mask = np.arange(40)[None] < lengths[:, None]
    model.train()
    model(jnp.asarray(x), jnp.asarray(mask))  # one training call: non-trivial BN statistics
    model.eval()
    emb, aux = model(jnp.asarray(x), jnp.asarray(mask))
    assert np.allclose(np.linalg.norm(np.asarray(emb), axis=1), 1.0, atol=1e-5)
    for b in range(3):
        n = lengths[b]
        alone, aux1 = model(jnp.asarray(x[b : b + 1, :n]), jnp.ones((1, n), bool))
        # more padding, filled with junk that the mask must hide
        junk = np.concatenate([x[b : b + 1, :n], np.full((1, 11, 16), 7.0, np.float32)], 1)
        padded, _ = model(jnp.asarray(junk), jnp.asarray(np.arange(n + 11)[None] < n))
        np.testing.assert_allclose(np.asarray(emb[b]), np.asarray(alone[0]), atol=1e-5)
        np.testing.assert_allclose(np.asarray(padded[0]), np.asarray(alone[0]), atol=1e-5)
        np.testing.assert_allclose(np.asarray(aux["logits"][b]), np.asarray(aux1["logits"][0]),
                                   atol=1e-4)


def test_masked_pooling_matches_numpy():
    rng = np.random.default_rng(1)
    h = rng.standard_normal((2, 7, 3)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0, 0, 0], [1] * 7], bool)
    np.testing.assert_allclose(np.asarray(masked_mean(jnp.asarray(h), jnp.asarray(mask)))[0],
                               h[0, :3].mean(0), atol=1e-6)
    pool = MaskedPooling(3, "attentive_stats", hidden=4, rngs=nnx.Rngs(0))
    out = np.asarray(pool(jnp.asarray(h), jnp.asarray(mask)))
    w1, b1 = np.asarray(pool.attention.kernel[...]), np.asarray(pool.attention.bias[...])
    w2, b2 = np.asarray(pool.score.kernel[...]), np.asarray(pool.score.bias[...])
    for b in range(2):
        v = h[b, mask[b]].astype(np.float64)
        e = (np.tanh(v @ w1 + b1) @ w2 + b2)[:, 0]
        a = np.exp(e - e.max())
        a /= a.sum()
        mu = a @ v
        sd = np.sqrt(a @ v**2 - mu**2 + 1e-5)
        np.testing.assert_allclose(out[b], np.concatenate([mu, sd]), atol=1e-5)
