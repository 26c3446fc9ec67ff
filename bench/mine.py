"""Benchmark of `qkdissect mine`'s per-batch work, as ratios measured in one run.

(a) Overhead of mining over a bare forward pass of the same model on the same batches: the
    forward pass with hooks, the projections of all layers / heads / modes, the reductions over
    tokens, the statistics and the top-k merge, against ``forward_features`` alone.
(b) Throughput against the reference notebook's approach (schwartz-cnl/DissectingViT,
    look_for_optimal_imagenet_photo.ipynb) on the same images: batch size 1, Python loops over
    layers and heads, projections of the hidden states onto the dense d_model × d_model singular
    vectors of M = W_qᵀW_k. Two versions of the reference are timed:
      * "as written": one pass per sign, and per head the eight dense projections the notebook
        makes (mean, max, top-5 mean of the U and V maps, and the product score);
      * "minimal": one pass, and per head only the two projections the product score needs,
        both signs from them — the most charitable reading of the approach.
    Images are decoded and preprocessed beforehand for every method (decoding is not timed).

Both wall-clock time and the process's CPU time (all threads) are reported: on a shared
machine the CPU time is the steadier measure of the work done.

Model: ViT-S/16-shaped timm model with random weights (no downloads), 224 px, on CPU with a
fixed number of threads. Run:  PYTHONPATH=src python bench/mine.py [--images 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a shared machine a spinning thread steals the
# core its sibling needs, which punishes every parallel region (set before torch starts OpenMP).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def make_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` natural images: random crops / flips of skimage.data pictures, saved as PNG."""
    from PIL import Image
    from skimage import data

    names = ["astronaut", "coffee", "chelsea", "camera", "rocket", "cat", "coins", "horse", "moon", "page",
             "immunohistochemistry", "hubble_deep_field", "retina", "text", "brick", "grass", "gravel", "colorwheel"]
    sources = []
    for name in names:
        try:
            array = getattr(data, name)()
        except Exception:  # noqa: BLE001 — some data files may be missing
            continue
        if array.dtype == bool:
            array = (array * 255).astype(np.uint8)
        sources.append(Image.fromarray(array).convert("RGB"))
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        image = sources[i % len(sources)]
        w, h = image.size
        side = int(rng.uniform(0.5, 1.0) * min(w, h))
        left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = image.crop((left, top, left + side, top + side))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = folder / f"img_{i:03d}.png"
        crop.save(path)
        paths.append(path)
    return paths


def reference_notebook(model, blocks, dense_U, dense_Vt, pixels, n_prefix, as_written: bool) -> None:
    """The notebook's per-image loop (see the module docstring); results kept in Python lists."""
    n_layers, n_heads = dense_U.shape[:2]
    signs = (1.0, -1.0) if as_written else (1.0,)
    results = []
    for sign in signs:
        U_total, Vt_total = sign * dense_U, sign * dense_Vt
        for image in pixels:
            hidden = []
            handles = [block.register_forward_pre_hook(lambda _m, args, out=hidden: out.append(args[0])) for block in blocks]
            with torch.no_grad():
                model.forward_features(image[None])
            for handle in handles:
                handle.remove()
            per_layer = []
            for layer in range(n_layers):
                x = hidden[layer]
                per_head = []
                for head in range(n_heads):
                    U, Vt = U_total[layer, head], Vt_total[layer, head]
                    if as_written:
                        mean_u = torch.mean((x @ U)[:, n_prefix:], dim=1)[0].numpy()
                        mean_v = torch.mean((x @ Vt.T)[:, n_prefix:], dim=1)[0].numpy()
                        max_u = torch.max((x @ U)[:, n_prefix:], dim=1)[0][0].numpy()
                        max_v = torch.max((x @ Vt.T)[:, n_prefix:], dim=1)[0][0].numpy()
                        top5_u = torch.mean(torch.topk((x @ U)[:, n_prefix:], 5, dim=1)[0], dim=1)[0].numpy()
                        top5_v = torch.mean(torch.topk((x @ Vt.T)[:, n_prefix:], 5, dim=1)[0], dim=1)[0].numpy()
                        product = (torch.max((x @ U)[:, n_prefix:], dim=1)[0][0].numpy()
                                   * torch.max((x @ Vt.T)[:, n_prefix:], dim=1)[0][0].numpy())
                        per_head.append((mean_u, mean_v, max_u, max_v, top5_u, top5_v, product))
                    else:
                        pu, pv = (x @ U)[0, n_prefix:], (x @ Vt.T)[0, n_prefix:]
                        per_head.append((pu.max(0)[0] * pv.max(0)[0]).numpy())
                        per_head.append(((-pu).max(0)[0] * (-pv).max(0)[0]).numpy())
                per_layer.append(per_head)
            results.append(per_layer)
    # the notebook ranks afterwards with np.argsort over all images: cheap, included
    if not as_written:
        stacked = np.asarray([[np.stack(h) for h in layer] for layer in results])
        np.argsort(stacked, axis=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions of (a); medians reported")
    parser.add_argument("--reference-images", type=int, default=8, help="images timed for the reference (b)")
    parser.add_argument("--top", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import timm

    from qkdissect import dissect
    from qkdissect.adapters import wrap_model
    from qkdissect.images import open_image
    from qkdissect.mining.engine import MiningEngine
    from qkdissect.mining.state import empty_state

    model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    loaded = wrap_model(model, spec="timm:vit_small_patch16_224 (random init)")
    started = time.perf_counter()
    atlas = dissect(loaded, dtype="float64", null_samples=16)
    print(f"model: ViT-S/16 random init, {atlas.n_layers} layers × {atlas.n_heads} heads × {atlas.rank} modes, "
          f"d_model {atlas.d_model}; torch {torch.__version__}, {args.threads} threads; "
          f"factored SVD of all heads {time.perf_counter() - started:.2f} s")
    preprocessing = loaded.preprocessing
    grid = loaded.adapter.patch_grid(preprocessing.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp), args.images)
        pixels = torch.stack([preprocessing(open_image(p)) for p in paths])
    batches = list(torch.split(pixels, args.batch_size))
    layers = range(atlas.n_layers)
    engines = {
        "mine (full forward)": MiningEngine(loaded, atlas, layers, top_k=args.top, map_modes=range(4), grid=grid,
                                            stop_early=False),
        "mine (as run: stops after last q/k)": MiningEngine(loaded, atlas, layers, top_k=args.top,
                                                            map_modes=range(4), grid=grid),
        "mine, x̃ route (d×d matmul, full forward)": MiningEngine(loaded, atlas, layers, top_k=args.top,
                                                                map_modes=range(4), grid=grid, route="x",
                                                                stop_early=False),
    }
    base = engines["mine (full forward)"]

    def new_state():
        return empty_state(atlas.n_layers, atlas.n_heads, atlas.rank, args.top, 4, grid[0] * grid[1])

    def clock(fn) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process — all threads)."""
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - wall, time.process_time() - cpu

    states = {name: new_state() for name in engines}
    base.bare_forward(batches[0])  # warm-up
    for name, engine in engines.items():
        states[name] = engine.step(batches[0], torch.arange(len(batches[0])), *states[name])
    names = ["bare forward", *engines]
    totals = {name: [[0.0, 0.0] for _ in range(args.reps)] for name in names}
    for rep in range(args.reps):  # interleaved per batch, so that load changes hit every method alike
        states = {name: new_state() for name in engines}
        offset = 0
        for batch in batches:
            index = torch.arange(offset, offset + len(batch))
            offset += len(batch)
            for name in names:
                if name == "bare forward":
                    wall, cpu = clock(lambda batch=batch: base.bare_forward(batch))
                else:
                    engine = engines[name]
                    wall, cpu = clock(lambda name=name, engine=engine, batch=batch, index=index, states=states:
                                      states.__setitem__(name, engine.step(batch, index, *states[name])))
                totals[name][rep][0] += wall
                totals[name][rep][1] += cpu
    median = {name: (statistics.median(t[0] for t in totals[name]), statistics.median(t[1] for t in totals[name]))
              for name in names}
    print(f"\n(a) {args.images} images of 224 px in batches of {args.batch_size}; medians of {args.reps} runs, "
          "methods interleaved per batch")
    print(f"    {'method':44s} {'wall s':>7s} {'img/s':>6s} {'overhead':>9s} {'CPU s':>7s} {'overhead':>9s}")
    bare_wall, bare_cpu = median["bare forward"]
    for name in names:
        wall, cpu = median[name]
        extra = "" if name == "bare forward" else f" {wall / bare_wall - 1:+9.1%}"
        extra_cpu = "" if name == "bare forward" else f" {cpu / bare_cpu - 1:+9.1%}"
        print(f"    {name:44s} {wall:7.2f} {args.images / wall:6.1f}{extra or ' ' * 10} {cpu:7.2f}{extra_cpu}")

    # (b) the notebook's approach: dense SVD per head (precomputed, not timed), batch 1, loops
    layers_qk = loaded.adapter.attention_layers()
    dense_U, dense_Vt = [], []
    for layer in layers_qk:
        M = torch.einsum("hed,hef->hdf", layer.W_q.double(), layer.W_k.double())  # (H, d, d)
        U, _, Vt = np.linalg.svd(M.numpy())
        dense_U.append(torch.from_numpy(U).float())
        dense_Vt.append(torch.from_numpy(Vt).float())
    dense_U, dense_Vt = torch.stack(dense_U), torch.stack(dense_Vt)
    n_prefix = len(loaded.adapter.prefix_tokens)
    subset = pixels[: args.reference_images]
    ours_wall, ours_cpu = (args.images / t for t in median["mine (as run: stops after last q/k)"])
    print(f"\n(b) reference notebook approach on the first {len(subset)} of the same images (batch 1, loops over "
          "layers and heads, dense d×d projections)")
    for label, as_written in (("as written (2 sign passes, 8 projections/head)", True),
                              ("minimal (1 pass, 2 projections/head)", False)):
        wall, cpu = clock(lambda as_written=as_written: reference_notebook(model, model.blocks, dense_U, dense_Vt,
                                                                           subset, n_prefix, as_written))
        rate_wall, rate_cpu = len(subset) / wall, len(subset) / cpu
        print(f"    {label}:\n      wall: reference {rate_wall:6.2f} img/s, qkdissect {ours_wall:6.1f} img/s, "
              f"speed-up {ours_wall / rate_wall:5.1f}×   |   per CPU second: reference {rate_cpu:6.2f}, "
              f"qkdissect {ours_cpu:6.1f}, speed-up {ours_cpu / rate_cpu:5.1f}×")


if __name__ == "__main__":
    main()
