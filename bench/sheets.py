"""Benchmark: contact sheets of the demo (builtin:oddvit, 6 layers × 6 heads × modes 0–3 × 2 signs = 288 sheets,
top 9 of 1000 procedural-world images) against the mining pass that precedes them.

Mines the 1000 images once (no sheets; the mining time is the reference of the demo's "sheets ≤ 1/5 of mining"),
then draws all 288 sheets in rounds alternating one process and ``--workers`` processes (fresh folders each time),
and the 8 sheets the demo itself draws (one head). Prints medians and the load average.

    PYTHONPATH=src python bench/sheets.py [--images 1000] [--rounds 2] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from qkdissect import dissect, load_model
    from qkdissect.mining import load_mined, mine
    from qkdissect.mining.sheets import draw_sheets
    from qkdissect.synthetic.world import write_world_images

    work = Path(tempfile.mkdtemp(prefix="qkdissect-sheets-"))
    try:
        loaded = load_model("builtin:oddvit")
        atlas = dissect(loaded, null_samples=1000)
        height, width = loaded.preprocessing.image_size
        world = write_world_images(work / "world", args.images, seed=0, size=min(height, width))
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        mine(loaded, world, work / "mined", top_k=9, batch_size=32, atlas=atlas, sheet_modes=(0, 1, 2, 3),
             sheets=False)
        mining = time.perf_counter() - started
        result = load_mined(work / "mined")
        head = int(atlas.weighted_cosines[0].argmax())
        times: dict[str, list[float]] = {"288 sheets, 1 process": [], f"288 sheets, {args.workers} processes": [],
                                         "8 sheets (the demo's head)": []}
        for round_ in range(args.rounds):
            for label, workers, heads in (("288 sheets, 1 process", 0, None),
                                          (f"288 sheets, {args.workers} processes", args.workers, None),
                                          ("8 sheets (the demo's head)", 0, [(0, head)])):
                target = work / f"sheets-{round_}-{workers}-{heads is None}"
                started = time.perf_counter()
                drawn = draw_sheets(result, target, workers=workers, heads=heads)
                times[label].append(time.perf_counter() - started)
                assert len(drawn) == (288 if heads is None else 8) and len(list(target.rglob("*.png"))) == len(drawn)
                shutil.rmtree(target)
        print(f"mining {args.images} images (oddvit, batch 32, {args.threads} threads, no sheets): {mining:.2f} s; "
              f"load average {load_before:.2f} before")
        print(f"{'contact sheets':<32}{'median s':>9}{'÷ mining':>10}")
        for label, values in times.items():
            print(f"{label:<32}{statistics.median(values):>9.2f}{statistics.median(values) / mining:>10.3f}")
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
