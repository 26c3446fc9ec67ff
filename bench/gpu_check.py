"""GPU check of dissection and mining (run by bench/gpu_check.sh; see there). Every step prints PASS / FAIL with
the tolerance it checks and the numbers it measured; the exit status is 1 if any check failed.

1. dissect a ViT-L-shaped model (timm vit_large_patch16_224, random init) on the device and on the CPU: singular
   values to 1e-4 relative, cosines of the modes to 1e-3 absolute.
2. write N synthetic images (random crops of skimage.data pictures, JPEG) as WebDataset shards (in parallel).
3. bare forward pass of a ViT-B-shaped model on the device, float32 and bf16 autocast: images/s.
4. ``mine`` the N images on the device (--amp bf16): images/s end to end (decoding workers, maps, no sheets) —
   and the peak GPU memory.
5. the first M images mined on the CPU (float32) and on the device (float32 with TF32 off, and bf16): scores to
   1e-3 (float32) and 2e-2 (bf16: 8 mantissa bits through every layer of the residual stream) relative to the
   slot's top score; top-k image sets identical on every slot whose k-th and (k+1)-th scores differ by more than
   twice that (the fraction of all slots identical is printed).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

FAILED: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def _shard(job: tuple[str, int, int, int]) -> int:
    from PIL import Image
    from skimage import data

    path, first, count, seed = job
    pictures = [Image.fromarray(getattr(data, n)()).convert("RGB") for n in ("astronaut", "coffee", "chelsea",
                                                                               "rocket", "cat", "horse")]
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w") as tar:
        for i in range(first, first + count):
            image = pictures[i % len(pictures)]
            w, h = image.size
            side = int(rng.uniform(0.4, 1.0) * min(w, h))
            left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            crop = image.crop((left, top, left + side, top + side)).resize((256, 256))
            buffer = io.BytesIO()
            crop.save(buffer, "JPEG", quality=90)
            info = tarfile.TarInfo(f"{i:08d}.jpg")
            info.size = len(buffer.getvalue())
            tar.addfile(info, io.BytesIO(buffer.getvalue()))
    return count


def write_shards(folder: Path, count: int, per_shard: int = 1000) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder / f"{n:06d}.tar"), start, min(per_shard, count - start), n)
            for n, start in enumerate(range(0, count, per_shard))]
    with ProcessPoolExecutor(max(1, min(len(jobs), (os.cpu_count() or 2) - 1))) as pool:
        assert sum(pool.map(_shard, jobs)) == count
    return str(folder) + "/{000000..%06d}.tar" % (len(jobs) - 1)


def compare(name: str, reference, other, tolerance: float) -> None:
    """Scores relative to the slot's top score; top-k image sets on every slot whose k-th kept and (k+1)-th
    scores (the reference keeps k + 1) differ by more than twice the tolerance."""
    k = other.topk.k
    scale = reference.topk.scores[..., :1].abs().clamp_min(1e-12)
    error = float(((other.topk.scores - reference.topk.scores[..., :k]).abs() / scale).max())
    a, b = reference.topk.image[..., :k].sort(dim=-1).values, other.topk.image.sort(dim=-1).values
    same = (a == b).all(dim=-1)
    gap = (reference.topk.scores[..., k - 1] - reference.topk.scores[..., k]) / scale[..., 0]
    clear = gap > 2 * tolerance
    check(f"{name} scores", error <= tolerance, f"max error {error:.2e} of the slot's top score (≤ {tolerance:g})")
    detail = (f"{float(same[clear].double().mean()) if bool(clear.any()) else 1.0:.4f} of the {int(clear.sum())} "
              f"slots with a gap > {2 * tolerance:g} at the k-th image identical (must be 1); "
              f"{float(same.double().mean()):.4f} of all {same.numel()} slots")
    check(f"{name} top-k sets", bool(same[clear].all()), detail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--check-images", type=int, default=512)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--large-model", default="vit_large_patch16_224")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 for the comparison with the CPU
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    import timm

    from qkdissect import dissect
    from qkdissect.adapters import wrap_model
    from qkdissect.images import open_image
    from qkdissect.metrics import mode_cosines
    from qkdissect.mining import mine
    from qkdissect.mining.readers import read_unit
    from qkdissect.mining.sources import open_source

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}); torch {torch.__version__}; {os.cpu_count()} CPUs", flush=True)

    print(f"1. dissect {args.large_model} (random init) on {device} and on the CPU", flush=True)
    large = wrap_model(timm.create_model(args.large_model, pretrained=False).eval(), spec=args.large_model)
    started = time.perf_counter()
    on_device = dissect(large, device=device, null_samples=1000)
    seconds = time.perf_counter() - started
    on_cpu = dissect(large, null_samples=1000)
    s_err = max(float(((a.S - b.S).abs() / b.S[..., :1]).max()) for a, b in zip(on_device.layers, on_cpu.layers))
    c_err = max(float((mode_cosines(a.U, a.V) - mode_cosines(b.U, b.V)).abs().max())
                for a, b in zip(on_device.layers, on_cpu.layers))
    check("dissect singular values", s_err <= 1e-4, f"{s_err:.1e} relative (≤ 1e-4); {seconds:.2f} s on {device}")
    check("dissect cosines", c_err <= 1e-3, f"{c_err:.1e} absolute (≤ 1e-3)")
    del large

    with tempfile.TemporaryDirectory(prefix="qkdissect-gpu-check-") as tmp:
        started = time.perf_counter()
        spec = write_shards(Path(tmp) / "shards", args.images)
        print(f"2. {args.images} images written as shards in {time.perf_counter() - started:.1f} s", flush=True)

        model = wrap_model(timm.create_model(args.model, pretrained=False).eval(), spec=args.model)
        atlas = dissect(model, dtype="float64", null_samples=64)
        source = open_source(spec, batch_size=args.batch_size)
        samples = list(read_unit(source, 0))[: args.batch_size]
        pixels = torch.stack([model.preprocessing(open_image(s.payload, name=s.id)) for s in samples]).to(device)
        model.model.to(device)
        print(f"3. bare forward of {args.model}, batch {args.batch_size}", flush=True)
        for amp in (None, torch.bfloat16):
            autocast = contextlib.nullcontext() if amp is None else torch.autocast(device.type, dtype=amp)
            with torch.no_grad(), autocast:
                for _ in range(3):
                    model.model.forward_features(pixels)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                started, repeats = time.perf_counter(), 10
                for _ in range(repeats):
                    model.model.forward_features(pixels)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            rate = repeats * len(pixels) / (time.perf_counter() - started)
            print(f"   {'bf16 autocast' if amp else 'float32'}: {rate:.0f} images/s", flush=True)

        print(f"4. mine {args.images} images on {device} (--amp bf16, {args.workers} decoding workers, no sheets)",
              flush=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        result = mine(model, spec, Path(tmp) / "mined", batch_size=args.batch_size, workers=args.workers,
                      atlas=atlas, device=str(device), amp="bf16", sheets=False, checkpoint_every=50)
        seconds = time.perf_counter() - started
        memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        print(f"   {args.images / seconds:.0f} images/s end to end ({seconds:.1f} s; mining pass "
              f"{result.meta['mining_seconds']:.1f} s); peak GPU memory {memory:.1f} GiB", flush=True)
        check("mine read every image", result.meta["n_processed"] == args.images,
              f"{result.meta['n_processed']} of {args.images}")

        print(f"5. the first {args.check_images} images: CPU float32 against {device} float32 and bf16", flush=True)
        subset = str(Path(tmp) / "shards" / "000000.tar")
        small = Path(tmp) / "subset"
        small.mkdir()
        with tarfile.open(subset) as tar, tarfile.open(small / "000000.tar", "w") as out:
            for member in tar.getmembers()[: args.check_images]:
                out.addfile(member, tar.extractfile(member))
        settings = dict(batch_size=32, workers=2, atlas=atlas, sheets=False, sheet_modes=(0, 1))
        reference = mine(model, str(small / "000000.tar"), Path(tmp) / "cpu", top_k=10, **settings)
        for amp, tolerance in ((None, 1e-3), ("bf16", 2e-2)):
            other = mine(model, str(small / "000000.tar"), Path(tmp) / f"dev-{amp}", device=str(device), amp=amp,
                         top_k=9, **settings)
            compare(f"{device} {amp or 'float32'} vs CPU float32", reference, other, tolerance)
    print("ALL CHECKS PASSED" if not FAILED else f"FAILED: {', '.join(FAILED)}", flush=True)
    raise SystemExit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
