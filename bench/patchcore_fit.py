"""Benchmark: PatchCore fit time on CPU, and the fast coreset against the naive one.

Fits PatchCore (resnet18, randomly initialised, layer2 + layer3, coreset ratio 0.1) on 100
structured random 256 x 256 images with 2 torch threads, prints the fit time split into feature
extraction and coreset selection, the memory-bank size, and then times the triangle-inequality
pruned coreset against the naive greedy loop on the same projected features (and checks that
both select the same indices).

    python bench/patchcore_fit.py [--images 100] [--size 256] [--threads 2] [--skip-naive]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

import models
from models.components.coreset import greedy_coreset, naive_greedy_coreset


def structured_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Normalised ``n x 3 x size x size`` images: a jittered periodic texture, a band, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images = []
    for _ in range(n):
        dx, dy = rng.uniform(-4, 4, size=2)
        period = rng.uniform(14, 18)
        image = 0.5 + 0.2 * np.sin(2 * math.pi * (xx + dx) / period) * np.cos(
            2 * math.pi * (yy + dy) / period
        )
        band = np.abs(yy + dy - size / 2) < size / 8
        image = np.where(band, 0.6 * image + 0.3, image) + rng.normal(0, 0.05, image.shape)
        images.append(image.astype(np.float32))
    gray = torch.from_numpy(np.stack(images))[:, None]
    return ((gray - 0.45) / 0.225).repeat(1, 3, 1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--skip-naive", action="store_true", help="skip the slow naive coreset")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    images = structured_images(args.images, args.size, seed=0)
    batches = [images[i : i + args.batch_size] for i in range(0, len(images), args.batch_size)]
    detector = models.create(
        "patchcore",
        backbone="resnet18",
        layers=("layer2", "layer3"),
        coreset_ratio=0.1,
        pretrained=False,
    )
    started = time.perf_counter()
    stats = detector.fit(batches)
    total = time.perf_counter() - started
    print(
        f"patchcore fit: {args.images} images {args.size}x{args.size}, resnet18 layer2+layer3, "
        f"coreset_ratio 0.1, {args.threads} threads"
    )
    print(f"  total fit            {total:7.2f} s")
    print(f"  feature extraction   {stats['feature_s']:7.2f} s")
    print(f"  coreset selection    {stats['coreset_s']:7.2f} s")
    print(f"  patches -> bank      {stats['n_patches']} -> {stats['memory_bank_size']}")

    if args.skip_naive:
        return
    with torch.no_grad():
        features = torch.cat(
            [detector.patch_features(b).permute(0, 2, 3, 1).reshape(-1, 384) for b in batches]
        )
    timings = {}
    selections = {}
    for name, select in (("pruned", greedy_coreset), ("naive", naive_greedy_coreset)):
        generator = torch.Generator().manual_seed(0)
        started = time.perf_counter()
        selections[name] = select(features, 0.1, projection_dim=128, generator=generator)
        timings[name] = time.perf_counter() - started
    same = torch.equal(selections["pruned"], selections["naive"])
    print(f"coreset on the same {features.shape[0]} x {features.shape[1]} features (to 128-d):")
    print(f"  pruned               {timings['pruned']:7.2f} s")
    print(f"  naive                {timings['naive']:7.2f} s")
    print(f"  speed-up             {timings['naive'] / timings['pruned']:7.1f} x")
    print(f"  same indices         {same}")


if __name__ == "__main__":
    main()
