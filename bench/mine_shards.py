"""Benchmark: ``qkdissect mine`` end to end from WebDataset shards against a bare forward pass of the same model.

ViT-B/16 shape (timm vit_base_patch16_224, random init), 224 px, batch 32, a fixed number of torch threads, N
synthetic natural images (crops / flips of skimage.data pictures, 256–480 px, JPEG) in 4 WebDataset shards.

  bare forward   ``forward_features`` on batches of already decoded, preprocessed pixels (the model's own speed)
  mine           ``qkdissect.mining.mine`` from the shards: decoding (DataLoader worker processes), the forward
                 pass with hooks, projections on all 12 × 12 × 64 modes, reductions, exact top-k and statistics,
                 checkpoints, the output files, maps of modes 0–3 and all 1152 contact sheets included

The bare forward pass is timed before and after the mining run (its mean is the reference), so that a change of
machine load during the run shows; wall time and the CPU time of the process tree are reported, and the load
average. Run:

    PYTHONPATH=src python bench/mine_shards.py [--images 2000] [--threads 2] [--workers 1]
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def write_shards(folder: Path, count: int, shards: int = 4, seed: int = 0) -> str:
    """``count`` JPEG images in ``shards`` tar shards; returns the brace pattern."""
    from PIL import Image
    from skimage import data

    names = ["astronaut", "coffee", "chelsea", "camera", "rocket", "cat", "coins", "horse", "immunohistochemistry",
             "hubble_deep_field", "retina", "brick", "grass", "gravel", "colorwheel"]
    sources = []
    for name in names:
        try:
            array = getattr(data, name)()
        except Exception:  # noqa: BLE001 — some data files may be missing
            continue
        array = (array * 255).astype(np.uint8) if array.dtype == bool else array.astype(np.uint8)
        sources.append(Image.fromarray(array).convert("RGB"))
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    per_shard = -(-count // shards)
    for shard in range(shards):
        with tarfile.open(folder / f"{shard:06d}.tar", "w") as tar:
            for i in range(shard * per_shard, min(count, (shard + 1) * per_shard)):
                image = sources[i % len(sources)]
                w, h = image.size
                side = int(rng.uniform(0.5, 1.0) * min(w, h))
                left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
                crop = image.crop((left, top, left + side, top + side)).resize((int(rng.integers(256, 480)),) * 2)
                if rng.random() < 0.5:
                    crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                buffer = io.BytesIO()
                crop.save(buffer, "JPEG", quality=90)
                for extension, payload in (("jpg", buffer.getvalue()), ("cls", str(i % 1000).encode())):
                    info = tarfile.TarInfo(f"{i:08d}.{extension}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(folder) + "/{000000..%06d}.tar" % (shards - 1)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the decoding workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader decoding processes")
    parser.add_argument("--bare-batches", type=int, default=8, help="batches timed for the bare pass, before and after")
    parser.add_argument("--model", default="vit_base_patch16_224")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import timm

    from qkdissect import dissect
    from qkdissect.adapters import wrap_model
    from qkdissect.images import open_image
    from qkdissect.mining import mine
    from qkdissect.mining.readers import read_unit
    from qkdissect.mining.sources import open_source

    work = Path(tempfile.mkdtemp(prefix="qkdissect-bench-"))
    try:
        started = time.perf_counter()
        spec = write_shards(work / "shards", args.images)
        print(f"{args.images} JPEG images in 4 shards written in {time.perf_counter() - started:.0f} s (not timed)")
        loaded = wrap_model(timm.create_model(args.model, pretrained=False).eval(), spec=f"timm:{args.model} (random)")
        atlas = dissect(loaded, dtype="float64", null_samples=64)
        source = open_source(spec, batch_size=args.batch_size)
        samples = [s for s in read_unit(source, 0)][: args.bare_batches * args.batch_size]
        pixels = torch.stack([loaded.preprocessing(open_image(s.payload, name=s.id)) for s in samples])
        batches = list(torch.split(pixels, args.batch_size))

        def bare() -> tuple[float, float]:
            with torch.no_grad():
                loaded.model.forward_features(batches[0])  # warm-up
                wall, cpu = time.perf_counter(), cpu_seconds()
                for batch in batches:
                    loaded.model.forward_features(batch)
            return len(pixels) / (time.perf_counter() - wall), len(pixels) / (cpu_seconds() - cpu)

        print(f"{args.model}: {atlas.n_layers} layers × {atlas.n_heads} heads × {atlas.rank} modes; batch "
              f"{args.batch_size}; {args.threads} torch threads; {args.workers} decoding worker(s); torch "
              f"{torch.__version__}; load average {os.getloadavg()[0]:.2f}")
        before = bare()
        load_before = os.getloadavg()[0]
        wall, cpu = time.perf_counter(), cpu_seconds()
        result = mine(loaded, spec, work / "mined", top_k=9, batch_size=args.batch_size, workers=args.workers,
                      atlas=atlas, sheet_modes=(0, 1, 2, 3), checkpoint_every=25)
        mine_wall, mine_cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        load_during = os.getloadavg()[0]
        after = bare()
        bare_wall, bare_cpu = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
        sheets = len(result.meta["sheets"])
        mining = result.meta["mining_seconds"]
        print(f"\nbare forward: {before[0]:.2f} img/s before, {after[0]:.2f} after (mean {bare_wall:.2f}); "
              f"per CPU second {bare_cpu:.2f}")
        print(f"mine:         {args.images / mine_wall:.2f} img/s end to end ({mine_wall:.0f} s: mining pass "
              f"{mining:.0f} s, then outputs and {sheets} contact sheets {mine_wall - mining:.0f} s); per CPU second "
              f"(workers included) {args.images / mine_cpu:.2f}")
        print(f"ratio mine / bare: wall {args.images / mine_wall / bare_wall:.3f}, CPU "
              f"{args.images / mine_cpu / bare_cpu:.3f} (target ≥ 0.9); load average {load_before:.2f} before, "
              f"{load_during:.2f} at the end of the run")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
