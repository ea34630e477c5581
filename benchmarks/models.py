"""Forward+backward throughput of ResNet-50: dml_jax (Flax NNX, jit) against PyTorch.

Usage (from the repository root)::

    python benchmarks/models.py            # batch 32, 224×224 (slow on a small CPU)
    python benchmarks/models.py --small    # batch 8, 64×64, a quick check
    python benchmarks/models.py --batch 16 --size 160 --steps 5

Both frameworks run one training-mode step (BatchNorm with batch statistics) of
``loss = sum(pooled_features ** 2) / B`` and its gradient w.r.t. all parameters, on the same
random images. Reports images/second for each and the ratio jax/torch. The torch model is
``torchvision.models.resnet50`` when importable, else the reference copy in
``tests/models/torch_refs.py`` (identical layers and names).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def bench_jax(batch: int, size: int, steps: int, warmup: int) -> float:
    """Images/second of a jitted forward+backward step of the dml_jax ResNet-50."""
    import jax
    from flax import nnx

    from dml_jax.models import resnet

    model = resnet.resnet50(rngs=nnx.Rngs(0))
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def step(params, rest, x):
        m = nnx.merge(graphdef, params, rest)
        loss_fn = lambda m: (m(x) ** 2).sum() / x.shape[0]
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        return loss, grads, nnx.state(m, nnx.BatchStat)

    x = jax.numpy.asarray(
        np.random.default_rng(0).standard_normal((batch, size, size, 3)), "float32"
    )
    for _ in range(warmup):
        jax.block_until_ready(step(params, rest, x))
    t = time.perf_counter()
    for _ in range(steps):
        jax.block_until_ready(step(params, rest, x))
    return batch * steps / (time.perf_counter() - t)


def bench_torch(batch: int, size: int, steps: int, warmup: int) -> float:
    """Images/second of a forward+backward step of torch's ResNet-50 (train mode)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    try:
        from torchvision.models import resnet50

        model = resnet50()
        pooled = lambda x: torch.flatten(
            model.avgpool(
                model.layer4(
                    model.layer3(
                        model.layer2(
                            model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x)))))
                        )
                    )
                )
            ),
            1,
        )
    except ImportError:
        from tests.models.torch_refs import TResNet

        model = TResNet("resnet50")
        pooled = model.pooled
    model.train()
    x = torch.from_numpy(
        np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    )

    def step():
        model.zero_grad(set_to_none=True)
        f = pooled(x)
        ((f**2).sum() / batch).backward()

    for _ in range(warmup):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> None:
    """Runs both benchmarks and prints images/second and the jax/torch ratio."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="batch 8 at 64×64, 3 steps")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--skip-torch", action="store_true")
    a = p.parse_args(argv)
    if a.small:
        a.batch, a.size, a.steps = 8, 64, 3
    print(f"ResNet-50 forward+backward, batch {a.batch}, {a.size}x{a.size}, {a.steps} timed steps")
    j = bench_jax(a.batch, a.size, a.steps, a.warmup)
    print(f"  dml_jax (jax {__import__('jax').__version__}): {j:8.2f} images/s")
    if a.skip_torch:
        return
    try:
        t = bench_torch(a.batch, a.size, a.steps, a.warmup)
    except ImportError:
        print("  torch not installed: no comparison")
        return
    print(f"  torch ({__import__('torch').__version__}):          {t:8.2f} images/s")
    print(f"  ratio jax/torch: {j / t:.2f}")


if __name__ == "__main__":
    main()
