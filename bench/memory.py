"""Benchmark: resident memory of ``qkdissect mine`` does not grow with the number of images.

Mines 1 000 and then 20 000 small synthetic images (64 px JPEGs; a tiny ViT, so that 20 000 images take a minute)
from WebDataset shards and from a folder, each run in a fresh process, with contact sheets. A thread samples the
process's resident set size (RSS, /proc/self/statm) every 0.1 s; printed per run: RSS after loading (before
mining), peak RSS during mining and sheets, and the difference. Memory that grew with the number of images would
show as a peak that rises from 1 000 to 20 000 images.

    PYTHONPATH=src python bench/memory.py [--sizes 1000 20000]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * PAGE / 2**20


def write_images(folder: Path, count: int, per_shard: int = 1000) -> None:
    """``count`` 64-px JPEGs, as shards under folder/shards and as files under folder/files."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "shards").mkdir(parents=True)
    (folder / "files").mkdir()
    base = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
    for shard in range(-(-count // per_shard)):
        with tarfile.open(folder / "shards" / f"{shard:06d}.tar", "w") as tar:
            for i in range(shard * per_shard, min(count, (shard + 1) * per_shard)):
                noise = rng.integers(-40, 40, (64, 64, 3))
                image = np.clip(np.kron(np.roll(base, i, axis=0), np.ones((8, 8, 1))) + noise, 0, 255)
                buffer = io.BytesIO()
                Image.fromarray(image.astype(np.uint8)).save(buffer, "JPEG", quality=85)
                data = buffer.getvalue()
                (folder / "files" / f"{i:06d}.jpg").write_bytes(data)
                info = tarfile.TarInfo(f"{i:06d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def child(images: str, out: str) -> None:
    """One mining run in this process; prints a JSON line with the memory measurements."""
    import timm
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    from qkdissect import dissect
    from qkdissect.adapters import wrap_model
    from qkdissect.mining import mine

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8, embed_dim=48,
                              depth=3, num_heads=4, num_classes=0).eval()
    loaded = wrap_model(model, spec="bench:tiny-vit-64px")
    atlas = dissect(loaded, dtype="float64", null_samples=16)
    peak, running = [rss_mb()], True
    baseline = peak[0]

    def sample() -> None:
        while running:
            peak.append(rss_mb())
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    started = time.perf_counter()
    result = mine(loaded, images, out, top_k=9, batch_size=64, workers=1, atlas=atlas, sheet_modes=(0, 1),
                  checkpoint_every=25)
    seconds = time.perf_counter() - started
    running = False
    thread.join()
    print(json.dumps({"images": result.meta["n_images"], "baseline_mb": baseline, "peak_mb": max(peak),
                      "end_mb": rss_mb(), "seconds": seconds, "sheets": len(result.meta["sheets"])}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 20000])
    parser.add_argument("--child", nargs=2, metavar=("IMAGES", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="qkdissect-memory-") as tmp:
        for size in args.sizes:
            folder = Path(tmp) / str(size)
            write_images(folder, size)
            for kind, images in (("shards", str(folder / "shards")), ("folder", str(folder / "files"))):
                done = subprocess.run([sys.executable, __file__, "--child", images, str(folder / f"mined-{kind}")],
                                      capture_output=True, text=True, env=os.environ)
                if done.returncode != 0:
                    raise SystemExit(done.stderr[-3000:])
                rows.append((kind, json.loads(done.stdout.strip().splitlines()[-1])))
    print(f"{'source':<8}{'images':>8}{'RSS loaded MB':>15}{'peak RSS MB':>13}{'growth MB':>11}{'seconds':>9}")
    for kind, row in rows:
        print(f"{kind:<8}{row['images']:>8}{row['baseline_mb']:>15.0f}{row['peak_mb']:>13.0f}"
              f"{row['peak_mb'] - row['baseline_mb']:>11.0f}{row['seconds']:>9.1f}")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
