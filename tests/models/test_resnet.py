"""ResNet: shapes, parameter counts, torch equivalence (eval and train-mode BatchNorm), errors."""

import re

import numpy as np
import pytest
from flax import nnx

from dml_jax.models import backbone_from_torch, count_params, resnet

torch = pytest.importorskip(
    "torch", reason="torch (the 'convert' extra) is needed for the torch-equivalence tests"
)
from tests.models import torch_refs  # noqa: E402

PUBLISHED_WITH_FC = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


@pytest.mark.parametrize("arch", list(PUBLISHED_WITH_FC))
def test_param_counts(arch):
    model = nnx.eval_shape(lambda: getattr(resnet, arch)(rngs=nnx.Rngs(0)))
    n = count_params(model)
    fc = model.num_features * 1000 + 1000
    assert n + fc == PUBLISHED_WITH_FC[arch]
    assert torch_refs.param_count(torch_refs.TResNet("resnet18")) == PUBLISHED_WITH_FC["resnet18"]


def _torch_model(arch, seed=0):
    torch.manual_seed(seed)
    m = torch_refs.TResNet(arch)
    torch_refs.randomize_bn(m, seed)
    return m.eval()


@pytest.mark.parametrize("arch", list(PUBLISHED_WITH_FC))
def test_eval_equivalence(arch):
    tm = _torch_model(arch)
    x = np.random.default_rng(0).standard_normal((2, 64, 64, 3), dtype=np.float32)
    with torch.no_grad():
        ref = tm.pooled(torch_refs.to_nchw(x)).numpy()
    model = backbone_from_torch(arch, tm.state_dict())
    out = nnx.jit(lambda m, x: m(x))(model, x)
    assert out.shape == ref.shape == (2, model.num_features)
    assert rel_err(out, ref) < 1e-4


def test_train_mode_batchnorm_equivalence():
    arch = "resnet18"
    tm = _torch_model(arch, seed=1)
    x = np.random.default_rng(1).standard_normal((4, 64, 64, 3), dtype=np.float32)
    model = backbone_from_torch(arch, tm.state_dict())
    tm.train()
    with torch.no_grad():
        ref = tm.pooled(torch_refs.to_nchw(x)).numpy()
    model.train()
    out = nnx.jit(lambda m, x: m(x))(model, x)
    assert rel_err(out, ref) < 1e-4
    sd = tm.state_dict()
    checked = 0
    for key, bn in [
        ("bn1", model.bn1),
        ("layer4.1.bn2", model.layer4[1].bn2),
        ("layer2.0.downsample.1", model.layer2[0].downsample.bn),
    ]:
        assert rel_err(bn.mean[...], sd[f"{key}.running_mean"].numpy()) < 1e-4, key
        assert rel_err(bn.var[...], sd[f"{key}.running_var"].numpy()) < 1e-4, key
        checked += 1
    assert checked == 3


def test_full_size_224_resnet50_features():
    tm = _torch_model("resnet50", seed=2)
    x = np.random.default_rng(2).standard_normal((1, 224, 224, 3), dtype=np.float32)
    with torch.no_grad():
        ref = tm.pooled(torch_refs.to_nchw(x)).numpy()
    model = backbone_from_torch("resnet50", tm.state_dict())
    feats = nnx.jit(lambda m, x: m.features(x))(model, x)
    assert feats["layer4"].shape == (1, 7, 7, 2048) and feats["stem"].shape == (1, 56, 56, 64)
    assert rel_err(feats["pooled"], ref) < 1e-4


def test_state_dict_errors_name_keys(tmp_path):
    sd = {k: v.numpy() for k, v in _torch_model("resnet18").state_dict().items()}
    missing = dict(sd)
    del missing["layer3.1.bn2.running_var"]
    with pytest.raises(KeyError, match=re.escape("layer3.1.bn2.running_var")):
        backbone_from_torch("resnet18", missing)
    extra = dict(sd, **{"layer5.0.conv1.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=re.escape("layer5.0.conv1.weight")):
        backbone_from_torch("resnet18", extra)
    bad = dict(sd, **{"layer1.0.conv1.weight": np.zeros((64, 64, 1, 1), np.float32)})
    with pytest.raises(ValueError, match=r"layer1.0.conv1.weight.*\(64, 64, 3, 3\)"):
        backbone_from_torch("resnet18", bad)
    with pytest.raises(ValueError, match="resnet50"):
        backbone_from_torch("resnet19", sd)
    # a file path (.pth, loaded with weights_only=True) works too, without fc
    path = tmp_path / "r18.pth"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items() if not k.startswith("fc.")}, path)
    model = backbone_from_torch("resnet18", str(path))
    assert model.num_features == 512


def test_pretrained_build_model_with_attention(tmp_path):
    from safetensors.numpy import save_file

    from dml_jax.models import build_model

    sd = {k: v.numpy() for k, v in _torch_model("resnet18").state_dict().items()}
    path = tmp_path / "r18.safetensors"
    save_file(sd, str(path))
    cfg = {
        "name": "resnet18",
        "pretrained": str(path),
        "embedding_dim": 8,
        "attention_after": ["layer3"],
        "freeze_bn": True,
        "num_classes": 5,
    }
    model = build_model(cfg, rngs=nnx.Rngs(0))
    kernel = sd["conv1.weight"].transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(model.backbone.conv1.kernel[...], kernel)
    emb, aux = nnx.jit(lambda m, x: m(x))(model, np.zeros((1, 32, 32, 3), np.float32))
    assert emb.shape == (1, 8) and aux["logits"].shape == (1, 5)
    assert hasattr(model.backbone, "attn_layer3")
