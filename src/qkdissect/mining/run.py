"""The mining run: one streaming pass over an image folder, batched, resumable, sharded with torchrun."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from qkdissect.adapters.loading import LoadedModel, wrap_model
from qkdissect.errors import QKDissectError
from qkdissect.files import atomic_write, write_json
from qkdissect.mining.engine import MiningEngine
from qkdissect.mining.result import (
    FORMAT,
    FORMAT_VERSION,
    SCORE,
    SIGN_FILES,
    MinedResult,
    images_fingerprint,
    load_mined,
    tensors_digest,
    weights_fingerprint,
)
from qkdissect.mining.sheets import render_contact_sheet
from qkdissect.mining.state import (
    RunningStats,
    TopK,
    empty_state,
    load_checkpoint,
    merge_stats,
    merge_topk,
    save_checkpoint,
    state_from_tensors,
    state_tensors,
)

__all__ = ["CRASH_HOOK", "mine"]

CRASH_HOOK = "QKDISSECT_TEST_CRASH_AFTER_BATCHES"  # test hook: raise after N batches of this run


# ----- data --------------------------------------------------------------------------------------------------
class _ImageFiles(torch.utils.data.Dataset):
    """Item i -> (i, pixels or None, reason or None); never raises for a bad file."""

    def __init__(self, paths: Sequence[Path], preprocessing):
        self.paths, self.preprocessing = list(paths), preprocessing

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from qkdissect.images import open_image

        try:
            return index, self.preprocessing(open_image(self.paths[index])), None
        except QKDissectError as error:
            return index, None, str(error)
        except Exception as error:  # noqa: BLE001 — e.g. a decompression bomb: skip, never crash the run
            return index, None, f"{self.paths[index]}: {type(error).__name__}: {error}"


def _collate(items):
    """-> (image indices (B,), pixels (B, 3, H, W) or None, [(index, reason)] of the bad files)."""
    good = [(i, pixels) for i, pixels, _ in items if pixels is not None]
    bad = [(i, reason) for i, pixels, reason in items if pixels is None]
    if not good:
        return torch.zeros(0, dtype=torch.int64), None, bad
    return torch.tensor([i for i, _ in good], dtype=torch.int64), torch.stack([p for _, p in good]), bad


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)


def _distributed(device: torch.device) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, initialised here) from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device, False
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    started = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        started = True
    return dist.get_rank(), dist.get_world_size(), device, started

# ----- the run -----------------------------------------------------------------------------------------------------
def _check_previous(out: Path, resume: bool, checkpoint: Path, fingerprint: dict[str, Any]) -> dict | None:
    """Decide what an existing folder means; returns the checkpoint meta to resume from (or None)."""
    finished = out / "mined.json"
    if not resume:
        if finished.exists() or any((out / "checkpoint").glob("*.safetensors")):
            raise QKDissectError(f"{out} already holds a mining run; pass --resume to continue it, or choose "
                                 "another --out folder.")
        return None
    if finished.exists():
        previous = json.loads(finished.read_text()).get("fingerprint", {})
        _compare(previous, fingerprint, finished)
        return {"finished": True}
    if not checkpoint.exists():
        return None
    topk, stats, meta = load_checkpoint(checkpoint)
    _compare(meta.get("fingerprint", {}), fingerprint, checkpoint)
    return {"topk": topk, "stats": stats, **meta}


def _compare(previous: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    differ = sorted(key for key in set(previous) | set(current) if previous.get(key) != current.get(key))
    if differ:
        details = "; ".join(f"{key}: was {previous.get(key)!r}, now {current.get(key)!r}" for key in differ[:4])
        raise QKDissectError(f"cannot resume from {where}: the run differs in {', '.join(differ)} ({details}). "
                             "Resume with the same model, image folder and settings, or use a new --out folder.")


def _gather(payload: dict[str, Any], world: int) -> list[dict[str, Any]] | None:
    import torch.distributed as dist

    gathered = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(payload, gathered, dst=0)
    return gathered


def mine(model: Any, images: str | os.PathLike, out: str | os.PathLike, *, top_k: int = 9, batch_size: int = 32,
         workers: int = 0, layers: Sequence[int] | None = None, sheet_modes: Sequence[int] | None = (0, 1, 2, 3),
         checkpoint_every: int = 25, resume: bool = False, device: str = "cpu", atlas: Any = None,
         route: str = "auto", sheets: bool = True,
         progress: Callable[[str, int, int], None] | None = None) -> MinedResult | None:
    """Mine the top-k images of every (layer, head, mode, sign) over the folder ``images``.

    ``sheet_modes``: modes (of every head) whose raw maps are kept and whose contact sheets are
    drawn (None: all modes). ``progress(stage, done, total)`` is called after each batch with
    stage "mining" and the number of files this process has finished, then per contact sheet
    with stage "sheets". Under torchrun (WORLD_SIZE > 1) each rank mines
    its block of batches and rank 0 merges and writes; other ranks return None.
    """
    from qkdissect.decomposition import dissect
    from qkdissect.files import library_versions
    from qkdissect.images import list_images
    from qkdissect.positional import refuse_windows

    started = time.perf_counter()
    loaded: LoadedModel = wrap_model(model)
    if loaded.adapter.modality != "image":
        raise QKDissectError(f"mine reads images; {loaded.spec} is a {loaded.adapter.modality} model.")
    if top_k < 1 or batch_size < 1 or checkpoint_every < 1:
        raise QKDissectError("--top, --batch-size and --checkpoint-every must be at least 1.")
    root = Path(images)
    paths = list_images(root)
    if not paths:
        raise QKDissectError(f"no images (jpg/jpeg/png/webp/bmp) found below {root}.")
    out = Path(out)
    device_ = torch.device(device)
    rank, world, device_, started_dist = _distributed(device_)
    if atlas is None:
        atlas = dissect(loaded, dtype="float64", null_samples=64)
    n_layers = atlas.n_layers
    layers = list(range(n_layers)) if layers is None else sorted(set(int(l) for l in layers))
    if not layers or layers[0] < 0 or layers[-1] >= n_layers:
        raise QKDissectError(f"layers must be within 0..{n_layers - 1}, got {layers}.")
    for layer in layers:  # window attention (Swin) is refused with its reason
        refuse_windows(atlas, layer)
    if atlas.ragged:
        raise QKDissectError("mining needs the same heads and width in every layer; this model's layers differ "
                             f"(d_model per layer {list(atlas.d_models)}).")
    map_modes = list(range(atlas.rank)) if sheet_modes is None else sorted(set(int(m) for m in sheet_modes))
    if any(not 0 <= m < atlas.rank for m in map_modes):
        raise QKDissectError(f"sheet modes must be within 0..{atlas.rank - 1}, got {map_modes}.")
    preprocessing = loaded.preprocessing
    grid = loaded.adapter.patch_grid(preprocessing.image_size)
    loaded.model.to(device_)
    engine = MiningEngine(loaded, atlas, layers, top_k=top_k, map_modes=map_modes, grid=grid, device=device_,
                          route=route)
    fingerprint = {
        "model": loaded.spec, "weights": weights_fingerprint(loaded.model),
        "atlas": tensors_digest({f"{i}.{n}": getattr(m, n) for i, m in enumerate(atlas.layers) for n in ("U", "S", "V")}),
        "images": images_fingerprint(root, paths), "n_images": len(paths), "top_k": top_k, "batch_size": batch_size,
        "layers": layers, "map_modes": map_modes, "preprocessing": preprocessing.to_dict(), "world_size": world,
        "format_version": FORMAT_VERSION}
    fingerprint = json.loads(json.dumps(fingerprint))  # the form it has when read back
    checkpoint = out / "checkpoint" / f"rank-{rank}-of-{world}.safetensors"
    previous = _check_previous(out, resume, checkpoint, fingerprint)
    _barrier(world)  # every rank has looked at the folder before any rank writes a checkpoint into it
    if previous is not None and previous.get("finished"):
        _finish_distributed(world, started_dist)
        return load_mined(out) if rank == 0 else None
    n_batches = math.ceil(len(paths) / batch_size)
    first, last = rank * n_batches // world, (rank + 1) * n_batches // world  # this rank's block of batches
    topk, stats = empty_state(len(layers), atlas.n_heads, atlas.rank, top_k, len(map_modes), grid[0] * grid[1],
                              device_)
    done, bad, seconds = 0, [], 0.0
    if previous is not None:
        topk, stats = previous["topk"].to(device_), previous["stats"].to(device_)
        done, bad, seconds = int(previous["batches_done"]), [tuple(b) for b in previous["bad"]], float(previous["seconds"])
    batches = [list(range(b * batch_size, min((b + 1) * batch_size, len(paths)))) for b in range(first + done, last)]
    files_before = sum(min((b + 1) * batch_size, len(paths)) - b * batch_size for b in range(first, first + done))
    total_files = sum(min((b + 1) * batch_size, len(paths)) - b * batch_size for b in range(first, last))
    loader = torch.utils.data.DataLoader(_ImageFiles(paths, preprocessing), batch_sampler=batches, num_workers=workers,
                                         collate_fn=_collate, worker_init_fn=_worker_init if workers else None,
                                         pin_memory=device_.type == "cuda")
    crash_after = int(os.environ.get(CRASH_HOOK, "0") or 0)
    files_done, run_started, this_run = files_before, time.perf_counter(), 0
    if progress is not None:
        progress("mining", files_done, total_files)
    for (index, pixels, bad_items), batch in zip(loader, batches):
        bad.extend((paths[i].relative_to(root).as_posix(), reason) for i, reason in bad_items)
        if pixels is not None:
            topk, stats = engine.step(pixels, index, topk, stats)
        done, this_run, files_done = done + 1, this_run + 1, files_done + len(batch)
        if done % checkpoint_every == 0 and first + done < last:
            save_checkpoint(checkpoint, topk, stats, {
                "fingerprint": fingerprint, "batches_done": done, "files_done": files_done, "bad": bad,
                "seconds": seconds + time.perf_counter() - run_started})
        if progress is not None:
            progress("mining", files_done, total_files)
        if crash_after and this_run >= crash_after:
            raise RuntimeError(f"{CRASH_HOOK}: simulated crash after {this_run} batches")
    seconds += time.perf_counter() - run_started
    topk, stats = topk.to("cpu"), stats.to("cpu")
    if world > 1:
        gathered = _gather({"state": state_tensors(topk, stats), "bad": bad, "seconds": seconds}, world)
        if rank == 0:
            for other in gathered[1:]:
                other_topk, other_stats = state_from_tensors(other["state"])
                topk = merge_topk(topk, other_topk, torch.tensor(map_modes, dtype=torch.long))
                stats = merge_stats(stats, other_stats)
                bad.extend(tuple(b) for b in other["bad"])
            seconds = max(float(g["seconds"]) for g in gathered)
    result = None
    if rank == 0:
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "model": loaded.spec, "checkpoint": loaded.checkpoint,
            "random_init": bool(loaded.info.get("random_init", False)), "family": loaded.family,
            "fingerprint": fingerprint, "preprocessing": preprocessing.to_dict(),
            "prefix_tokens": list(loaded.adapter.prefix_tokens), "grid": list(grid), "layers": layers,
            "n_heads": atlas.n_heads, "rank": atlas.rank, "top_k": top_k, "signs": ["+", "-"], "score": SCORE,
            "map_modes": map_modes, "image_root": str(root.resolve()), "n_images": len(paths),
            "n_processed": int(stats.images), "n_bad": len(bad),
            "bad_images": [{"path": p, "reason": r} for p, r in sorted(bad)[:1000]],
            "routes": engine.route_kinds, "batch_size": batch_size, "world_size": world, "device": str(device_),
            "mining_seconds": round(seconds, 3), "images_per_second": round(int(stats.images) / max(seconds, 1e-9), 3),
            "versions": library_versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        result = _write_outputs(out, meta, root, paths, topk, stats, bad, atlas, sheets, started, progress)
    _barrier(world)  # rank 0 has written the outputs: the checkpoints are no longer needed
    if checkpoint.exists():
        checkpoint.unlink()
    _barrier(world)
    if rank == 0:
        _remove_empty(out / "checkpoint")
    _finish_distributed(world, started_dist)
    return result


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _finish_distributed(world: int, started_here: bool) -> None:
    """Wait for every rank, then close the process group if this run opened it."""
    if world <= 1:
        return
    import torch.distributed as dist

    dist.barrier()
    if started_here:
        dist.destroy_process_group()


def _write_outputs(out: Path, meta: dict[str, Any], root: Path, paths: Sequence[Path], topk: TopK,
                   stats: RunningStats, bad: list, atlas, sheets: bool, started: float,
                   progress: Callable[[str, int, int], None] | None) -> MinedResult:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = state_tensors(topk, stats)
    atomic_write(out / "mined.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": FORMAT}))
    listing = "".join(p.relative_to(root).as_posix() + "\n" for p in paths)
    atomic_write(out / "images.txt", lambda p: p.write_text(listing))
    log = "".join(f"{path}\t{reason}\n" for path, reason in sorted(bad))
    atomic_write(out / "bad_images.log", lambda p: p.write_text(log))
    atlas.save(out / "atlas")
    meta["sheets"] = []
    write_json(out / "mined.json", meta)  # loadable before the sheets are drawn
    if sheets:
        result = load_mined(out)
        cache: dict[int, Any] = {}
        total = len(result.layers) * result.meta["n_heads"] * len(result.map_modes) * 2
        for layer in result.layers:
            for head in range(result.meta["n_heads"]):
                for mode in result.map_modes:
                    for sign in (0, 1):
                        png = out / "sheets" / f"L{layer:02d}" / f"H{head:02d}_m{mode:03d}_{SIGN_FILES[sign]}.png"
                        render_contact_sheet(result, layer, head, mode, sign, png, _cache=cache)
                        meta["sheets"].append({"layer": layer, "head": head, "mode": mode, "sign": "+-"[sign],
                                               "png": png.relative_to(out).as_posix()})
                        if progress is not None:
                            progress("sheets", len(meta["sheets"]), total)
    meta["total_seconds"] = round(time.perf_counter() - started, 3)
    write_json(out / "mined.json", meta)
    return load_mined(out)
