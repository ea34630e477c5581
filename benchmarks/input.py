"""Input-pipeline benchmark: dml_jax's training batches vs a torch DataLoader, in one run.

    python benchmarks/input.py                      # 2 workers, 64-image P x K batches
    python benchmarks/input.py --workers 4 --batches 40

Both sides read the same generated folder of 500 x 375 JPEGs, draw the same P x K batches,
decode with PIL and apply the same augmentation (random resized crop to 224, scale
(0.08, 1), ratio (3/4, 4/3), horizontal flip), producing uint8 ``[B, 224, 224, 3]`` batches
with the same number of worker processes. The torch side is torchvision's algorithm written
with PIL + torch tensors (``F.resized_crop`` = crop, then one bilinear resize; torchvision is
not installable next to this torch build).

Prints the CPU, then for each side (after warm-up batches, two per worker, that start the
workers; the sides alternate ``--repeats`` times) the best and median images/s and the ratio
dml_jax / torch. On a shared machine wall-clock rates swing with the load of other processes,
so it also prints images per CPU-second of the process tree (this process + its workers, from
/proc), which that load does not change. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dml_jax.data import PKSampler, image_folder, train_batches


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def tree_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its live children (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = sum(os.times()[:2])
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():  # a child of this process
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _timed(iterator, batches: int, batch_size: int) -> tuple[float, float]:
    """``(images/s, images per CPU-second)`` of the next ``batches`` batches of ``iterator``.

    The workers are still alive when the CPU time is read (the iterator is not exhausted).
    """
    cpu0, start = tree_cpu_seconds(), time.perf_counter()
    for _ in range(batches):
        next(iterator)
    cpu1, elapsed = tree_cpu_seconds(), time.perf_counter() - start
    count = batches * batch_size
    return count / elapsed, count / max(cpu1 - cpu0, 1e-9)


def make_folder(root: Path, classes: int, per_class: int, seed: int = 0) -> None:
    """``classes`` folders of ``per_class`` photo-like 500 x 375 JPEGs (smooth + noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    for c in range(classes):
        (root / f"class_{c:03d}").mkdir(parents=True)
        for i in range(per_class):
            f = rng.uniform(0.005, 0.05, (3, 2))
            phase = rng.uniform(0, 6.3, 3)
            base = np.stack([np.sin(xx * f[k, 0] + yy * f[k, 1] + phase[k]) for k in range(3)],
                            axis=-1)
            image = 127 + 90 * base + rng.normal(0, 12, base.shape)
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
                root / f"class_{c:03d}" / f"{i:04d}.jpg", quality=90)


class TorchPKDataset:
    """torch-style dataset: path -> PIL -> RandomResizedCrop + flip -> uint8 tensor HWC."""

    def __init__(self, paths, size=224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.paths, self.size, self.scale, self.ratio = paths, size, scale, ratio

    def __len__(self):
        return len(self.paths)

    def _params(self, width, height):
        import torch

        area = height * width
        log_ratio = torch.log(torch.tensor(self.ratio))
        for _ in range(10):
            target = area * torch.empty(1).uniform_(*self.scale).item()
            aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                i = torch.randint(0, height - h + 1, size=(1,)).item()
                j = torch.randint(0, width - w + 1, size=(1,)).item()
                return i, j, h, w
        return 0, 0, height, width

    def __getitem__(self, index):
        import torch

        with open(self.paths[index], "rb") as f:
            image = Image.open(f).convert("RGB")
        i, j, h, w = self._params(*image.size)
        image = image.crop((j, i, j + w, i + h)).resize((self.size, self.size),
                                                         Image.Resampling.BILINEAR)
        if torch.rand(1).item() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(image).copy())


class PKBatchSampler:
    """The same P x K index lists as dml_jax's sampler, for the torch DataLoader."""

    def __init__(self, sampler: PKSampler, num_batches: int):
        self.sampler, self.num_batches = sampler, num_batches

    def __iter__(self):
        for step in range(self.num_batches):
            yield self.sampler.batch_indices(step).tolist()

    def __len__(self):
        return self.num_batches


def _worker_seed(worker_id):
    import torch

    random.seed(worker_id)
    torch.manual_seed(worker_id)


def _warmup(workers: int) -> int:
    """Untimed batches: two per worker (spawned workers start one after the other)."""
    return max(1, 2 * workers)


def bench_torch(source, sampler, batches: int, workers: int) -> tuple[float, float]:
    import torch

    torch.set_num_threads(1)
    loader = torch.utils.data.DataLoader(
        TorchPKDataset(source.paths),
        batch_sampler=PKBatchSampler(sampler, batches + _warmup(workers) + 1),
        num_workers=workers, prefetch_factor=2 if workers else None,
        worker_init_fn=_worker_seed, persistent_workers=False)
    iterator = iter(loader)
    first = next(iterator)
    for _ in range(_warmup(workers) - 1):  # every worker has started and delivered
        next(iterator)
    assert first.shape == (sampler.batch_size, 224, 224, 3) and first.dtype == torch.uint8
    return _timed(iterator, batches, sampler.batch_size)


def bench_dml_jax(source, p: int, k: int, batches: int, workers: int,
                  draft: bool) -> tuple[float, float]:
    with train_batches(source, classes_per_batch=p, samples_per_class=k, image_size=224,
                       num_steps=batches + _warmup(workers) + 1, worker_count=workers,
                       jpeg_draft=draft) as it:
        first = next(it)
        for _ in range(_warmup(workers) - 1):  # every worker has started and delivered
            next(it)
        assert first["image"].shape == (p * k, 224, 224, 3)
        return _timed(it, batches, p * k)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=24, help="timed batches per run")
    parser.add_argument("--classes_per_batch", type=int, default=8)
    parser.add_argument("--samples_per_class", type=int, default=8)
    parser.add_argument("--classes", type=int, default=16)
    parser.add_argument("--per_class", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per side")
    parser.add_argument("--no_draft", action="store_true",
                        help="decode JPEGs at full scale (no DCT-scaled decoding)")
    args = parser.parse_args(argv)
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical cores; workers: {args.workers}; "
          f"batch {args.classes_per_batch} x {args.samples_per_class}; 500 x 375 JPEG -> 224")
    with tempfile.TemporaryDirectory() as tmp:
        make_folder(Path(tmp), args.classes, args.per_class)
        source = image_folder(tmp)
        sampler = PKSampler(source.labels, args.classes_per_batch, args.samples_per_class)
        ours, theirs = [], []
        for _ in range(args.repeats):  # alternate, so load changes hit both sides alike
            ours.append(bench_dml_jax(source, args.classes_per_batch, args.samples_per_class,
                                      args.batches, args.workers, not args.no_draft))
            theirs.append(bench_torch(source, sampler, args.batches, args.workers))
    for label, index in (("images/s", 0), ("images per CPU-second", 1)):
        a = [r[index] for r in ours]
        b = [r[index] for r in theirs]
        print(f"{label}: dml_jax best {max(a):.1f} median {np.median(a):.1f} | torch best "
              f"{max(b):.1f} median {np.median(b):.1f} | ratio best {max(a) / max(b):.2f}x "
              f"median {np.median(a) / np.median(b):.2f}x")
        print("   runs dml_jax: " + ", ".join(f"{v:.1f}" for v in a)
              + " | torch: " + ", ".join(f"{v:.1f}" for v in b))


if __name__ == "__main__":
    main()
