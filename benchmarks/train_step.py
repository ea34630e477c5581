"""Steps/s and images/s of the training step of each seed paper's network, against torch.

    python benchmarks/train_step.py                 # the papers' batches and input sizes
    python benchmarks/train_step.py --quick         # tiny batches and images: a CPU check
    python benchmarks/train_step.py --rows osm_caa:cub_raw --dtypes bfloat16 --steps 20

For each network (one config row per distinct network: ``experiments/configs``) and each
compute dtype (float32, bfloat16) it times ``dml_jax.train.make_train_step`` exactly as the
training loop runs it (jitted, state donated, uint8 images normalised on the device, the row's
loss, optimizer and learning-rate multipliers) on random images and P x K labels, then, in the
same process, the torch step of the same backbone (the reference modules of ``tests/models``,
identical layers to torchvision / Cadene) with a linear embedding, L2 normalisation, a
contrastive loss on the batch, backward and ``torch.optim.SGD`` (momentum 0.9). The torch
side has one embedding head: the Ranked List Loss row's two extra heads and the DeMAL row's
attention blocks are on the JAX side only. torch runs float32 (and bfloat16 autocast on CUDA
for the bfloat16 rows; on a CPU it stays float32). Prints one line per (row, dtype): median
step time, steps/s, images/s of each and the ratio torch time / JAX time (> 1: JAX faster).
Needs torch (the ``convert`` extra); runs on whatever device JAX and torch find (GPU: both).
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import statistics
import sys
import time

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# One config row per distinct network (backbone, heads, loss, batch, input size).
ROWS = ("osm_caa:cub_raw", "ranked_list:cub", "symmetric:cub_npair", "gong:uc_merced",
        "demal:isic2016")
NUM_CLASSES = {"osm_caa": 100, "ranked_list": 100, "symmetric": 100, "gong": 21, "demal": 2}


def row_config(row: str, quick: bool):
    file, name = row.split(":")
    config = importlib.import_module(f"experiments.configs.{file}").get_config(name)
    if quick:  # tiny batch and image (the real networks): a CPU check of the script
        config.classes_per_batch = min(config.classes_per_batch, 2)
        config.samples_per_class = 2
        config.dataset.image_size = 64
    return config


def batch_of(config, num_classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    size = config.dataset.image_size
    n = config.classes_per_batch * config.samples_per_class
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = np.repeat(rng.permutation(num_classes)[:config.classes_per_batch],
                       config.samples_per_class).astype(np.int32)
    return images, labels


def time_jax(config, num_classes: int, dtype: str, steps: int, warmup: int) -> float:
    """Median seconds of one jitted, donated train step (after ``warmup`` steps)."""
    import jax

    from dml_jax import train

    tx = train.make_optimizer(config, config.num_steps)
    graphdefs, state = train.create_state(config, num_classes, tx)
    step = jax.jit(train.make_train_step(
        graphdefs["train"], config.loss.to_dict(), tx,
        input_convention=config.model.input_convention, dtype=dtype), donate_argnums=0)
    images, labels = batch_of(config, num_classes)
    images, labels = jax.device_put(images), jax.device_put(labels)
    for _ in range(warmup):
        state, metrics = step(state, images, labels)
    jax.block_until_ready(metrics["loss"])
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = step(state, images, labels)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t)
    if not bool(metrics["finite"]):
        raise FloatingPointError(f"non-finite training step in {config.model.name}")
    return statistics.median(times)


def torch_backbone(name: str):
    """``(module, pooled(x) -> [B, F], F)`` of the torch reference of ``name``."""
    import torch

    if name == "bninception":
        from tests.models.test_bninception import TorchBNInception

        model = TorchBNInception()
        return model, lambda x: torch.mean(model(x), dim=(2, 3)), 1024
    if name == "googlenet":
        from tests.models.test_googlenet import TorchGoogLeNet

        model = TorchGoogLeNet(aux_logits=False)
        return model, model, 1024
    from tests.models.torch_refs import TResNet

    model = TResNet(name)
    return model, model.pooled, 2048


def time_torch(config, num_classes: int, dtype: str, steps: int, warmup: int) -> float:
    """Median seconds of the torch step: backbone + linear embedding + contrastive + SGD."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(os.cpu_count() or 1)
    backbone, pooled, features = torch_backbone(config.model.name)
    head = torch.nn.Linear(features, config.model.embedding_dim)
    backbone.to(device).train()
    head.to(device)
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    images, labels = batch_of(config, num_classes)
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 255.0
    y = torch.from_numpy(labels).to(device)
    same = (y[:, None] == y[None, :]).float()
    off = 1.0 - torch.eye(len(y), device=device)
    use_bf16 = dtype == "bfloat16" and device == "cuda"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=use_bf16):
            e = torch.nn.functional.normalize(head(pooled(x)).float(), dim=1)
        d = torch.cdist(e, e)
        pos = (same * off * d).sum() / (same * off).sum().clamp(min=1)
        neg = ((1 - same) * torch.relu(1.0 - d)).sum() / (1 - same).sum().clamp(min=1)
        (pos + neg).backward()
        opt.step()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="*", default=list(ROWS), help="file:row of each network")
    parser.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation)")
    parser.add_argument("--quick", action="store_true",
                        help="batch 2 x 2 of 64 px images, 2 timed steps: a CPU check")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch side")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 2, 1

    import jax

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x {jax.device_count()}; "
          f"CPU: {cpu_model()} ({os.cpu_count()} cores)")
    header = (f"{'row':22s} {'net':12s} {'batch':>9s} {'dtype':8s} {'jax s/step':>10s} "
              f"{'jax img/s':>9s} {'torch s/step':>12s} {'torch img/s':>11s} {'torch/jax':>9s}")
    print(header)
    for row in args.rows:
        config = row_config(row, args.quick)
        num_classes = NUM_CLASSES[row.split(":")[0]]
        n = config.classes_per_batch * config.samples_per_class
        size = config.dataset.image_size
        for dtype in args.dtypes:
            tj = time_jax(config, num_classes, dtype, args.steps, args.warmup)
            tt = (float("nan") if args.no_torch else
                  time_torch(config, num_classes, dtype, args.steps, args.warmup))
            print(f"{row:22s} {config.model.name:12s} {f'{n}x{size}':>9s} {dtype:8s} "
                  f"{tj:10.3f} {n / tj:9.1f} {tt:12.3f} {n / tt:11.1f} {tt / tj:9.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
