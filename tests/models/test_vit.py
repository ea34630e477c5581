"""ViT: parameter counts, torch (timm-layout) equivalence, errors, build_model."""

import re

import numpy as np
import pytest
from flax import nnx

from dml_jax.models import backbone_from_torch, build_model, count_params, vit

torch = pytest.importorskip(
    "torch", reason="torch (the 'convert' extra) is needed for the torch-equivalence tests"
)
from tests.models import torch_refs  # noqa: E402


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


@pytest.mark.parametrize(
    "arch, with_head", [("vit_small_patch16_224", 22_050_664), ("vit_base_patch16_224", 86_567_656)]
)
def test_param_counts(arch, with_head):
    model = nnx.eval_shape(lambda: getattr(vit, arch)(rngs=nnx.Rngs(0)))
    assert count_params(model) + model.num_features * 1000 + 1000 == with_head


def test_torch_reference_param_count():
    assert torch_refs.param_count(torch_refs.TViT()) == 22_050_664


def _jit_forward(model, x):
    return nnx.jit(lambda m, x: m(x))(model, x)


def test_tiny_vit_equivalence_and_interpolation():
    torch.manual_seed(0)
    tm = torch_refs.TViT(dim=64, depth=2, heads=4, patch=16, img=64).eval()
    x = np.random.default_rng(0).standard_normal((2, 64, 64, 3), dtype=np.float32)
    with torch.no_grad():
        ref = tm.pooled(torch_refs.to_nchw(x)).numpy()
    model = vit.vit_from_torch(tm.state_dict(), num_heads=4)
    assert model.img_size == 64 and len(model.blocks) == 2
    assert rel_err(_jit_forward(model, x), ref) < 1e-4
    # another input size: position embeddings resized (shape check only)
    assert _jit_forward(model, x[:, :48, :32]).shape == (2, 64)


def test_vit_small_224_equivalence():
    torch.manual_seed(1)
    tm = torch_refs.TViT().eval()
    x = np.random.default_rng(1).standard_normal((1, 224, 224, 3), dtype=np.float32)
    with torch.no_grad():
        ref = tm.pooled(torch_refs.to_nchw(x)).numpy()
    model = backbone_from_torch("vit_small_patch16_224", tm.state_dict())
    assert rel_err(_jit_forward(model, x), ref) < 1e-4


def test_vit_errors_name_keys():
    torch.manual_seed(0)
    sd = {k: v.numpy() for k, v in torch_refs.TViT(64, 2, 4, 16, 64).state_dict().items()}
    missing = dict(sd)
    del missing["blocks.1.attn.proj.bias"]
    with pytest.raises(KeyError, match=re.escape("blocks.1.attn.proj.bias")):
        vit.vit_from_torch(missing, num_heads=4)
    extra = dict(sd, fc_norm_weight=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="fc_norm_weight"):
        vit.vit_from_torch(extra, num_heads=4)
    bad = dict(sd, **{"blocks.0.mlp.fc2.weight": np.zeros((64, 8), np.float32)})
    with pytest.raises(ValueError, match=re.escape("blocks.0.mlp.fc2.weight")):
        vit.vit_from_torch(bad, num_heads=4)
    with pytest.raises(ValueError, match="width 64 and depth 2"):
        backbone_from_torch("vit_small_patch16_224", sd)


def test_build_model_vit_pooling():
    cfg = {"name": "vit_small_patch16_224", "embedding_dim": 8, "pooling": "max"}
    model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="no spatial feature map"):
        nnx.eval_shape(lambda m, x: m(x), model, np.zeros((1, 224, 224, 3), np.float32))
