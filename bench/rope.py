"""Benchmark: `qkdissect.dissect()` of a ViT-B/16-shaped RoPE model (content modes M(0), offset
average M̄, distance curve C_h(|Δ|), content/position split) against the same call on a plain
ViT-B/16 of the same shape (12 layers × 12 heads, d_model 768, d_head 64, 224 px, random init).

    python bench/rope.py [--threads 1] [--repeats 5] [--rope vit_base_patch16_rope_224]

The two models are dissected alternately in one process (A, B, A, B, ...) so that machine load hits
both alike; the report gives per-run times, medians and the ratio of the medians. Issue 13 asks for
ratio ≤ 2. The mixed variant (``--rope vit_base_patch16_rope_mixed_224``) has per-head, per-layer
frequencies, so its statistics cannot share one rotary table across heads and layers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rope", default="vit_base_patch16_rope_224", help="timm RoPE model name (random init)")
    parser.add_argument("--plain", default="vit_base_patch16_224", help="timm plain ViT of the same shape")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import timm

    from qkdissect import dissect
    from qkdissect.adapters import wrap_model

    torch.manual_seed(0)
    rope = wrap_model(timm.create_model(args.rope, pretrained=False, num_classes=0), spec=f"timm:{args.rope}")
    plain = wrap_model(timm.create_model(args.plain, pretrained=False, num_classes=0), spec=f"timm:{args.plain}")
    dissect(rope, null_samples=1000)  # warm-up (imports, allocator)
    dissect(plain, null_samples=1000)
    times: dict[str, list[float]] = {"rope": [], "plain": []}
    atlas = None
    for _ in range(args.repeats):
        for name, model in (("rope", rope), ("plain", plain)):
            start = time.perf_counter()
            result = dissect(model, null_samples=1000)
            times[name].append(time.perf_counter() - start)
            if name == "rope":
                atlas = result
    med = {name: statistics.median(values) for name, values in times.items()}
    stats = atlas.layers[0].positional
    print(f"threads {args.threads}, repeats {args.repeats}")
    print(f"{args.rope}: per run {[round(t, 3) for t in times['rope']]} s, median {med['rope']:.3f} s "
          f"(M(0), M̄, C_h(|Δ|) over {len(stats.distances)} distance bins, content/position split)")
    print(f"{args.plain}: per run {[round(t, 3) for t in times['plain']]} s, median {med['plain']:.3f} s")
    print(f"ratio rope / plain (medians): {med['rope'] / med['plain']:.2f}  (issue 13 asks for ≤ 2)")


if __name__ == "__main__":
    main()
