"""The mining run: one streaming pass over an image source, batched, resumable, sharded with torchrun.

Under torchrun each rank mines a contiguous block of the source's units (shards, Parquet row groups, or blocks of
``batch_size`` files); rank 0 gathers the exact states and writes the outputs. Checkpoints are per rank; a resume
reads every current checkpoint whatever the number of processes that wrote it, continues what is left with the
current number, and gives the same bits as an uninterrupted run (:mod:`qkdissect.mining.checkpoints`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from qkdissect.adapters.loading import LoadedModel, wrap_model
from qkdissect.errors import QKDissectError
from qkdissect.mining.checkpoints import (
    Coverage,
    ListingWriter,
    checkpoint_name,
    current_checkpoints,
    next_generation,
    remove_checkpoint_files,
)
from qkdissect.mining.engine import AMP_DTYPES, MiningEngine
from qkdissect.mining.loader import batch_loader
from qkdissect.mining.outputs import MiningFolder, save_atlas, stage_results
from qkdissect.mining.result import (
    FORMAT,
    FORMAT_VERSION,
    SCORE,
    MinedResult,
    load_mined,
    tensors_digest,
    weights_fingerprint,
)
from qkdissect.mining.sources import ImageSource, open_source
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

if TYPE_CHECKING:
    from qkdissect.atlas import ModeAtlas

__all__ = ["CRASH_HOOK", "mine"]

CRASH_HOOK = "QKDISSECT_TEST_CRASH_AFTER_BATCHES"  # test hook: raise after N batches of this run


def _device(device: str) -> torch.device:
    try:
        device_ = torch.device(device)
    except RuntimeError:
        raise QKDissectError(f"--device {device!r} is not a device name (cpu, cuda, cuda:1, …).") from None
    if device_.type == "cuda" and not torch.cuda.is_available():
        raise QKDissectError(f"--device {device}: CUDA is not available here (torch {torch.__version__}, "
                             f"built with CUDA {torch.version.cuda or 'none'}); use --device cpu.")
    return device_


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


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _compare(previous: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    differ = sorted(key for key in set(previous) | set(current) if previous.get(key) != current.get(key))
    if differ:
        details = "; ".join(f"{key}: was {previous.get(key)!r}, now {current.get(key)!r}" for key in differ[:4])
        raise QKDissectError(f"cannot resume from {where}: the run differs in {', '.join(differ)} ({details}). "
                             "Resume with the same model, images and settings, or use a new --out folder.")


def _versions(base: dict[str, str]) -> dict[str, str]:
    """The versions that shaped a mining result, the same in every process of an environment (not "what happens
    to be imported"): qkdissect, python, torch, numpy and the installed model / data libraries."""
    from importlib import metadata

    versions = {name: base[name] for name in ("qkdissect", "python", "torch", "numpy") if name in base}
    for name in ("timm", "transformers", "safetensors", "pillow", "webdataset", "pyarrow"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _block(rank: int, world: int, n_units: int) -> range:
    return range(rank * n_units // world, (rank + 1) * n_units // world)


def mine(model: Any, images: str | os.PathLike, out: str | os.PathLike, *, top_k: int = 9, batch_size: int = 32,
         workers: int = 0, layers: Sequence[int] | None = None, sheet_modes: Sequence[int] | None = (0, 1, 2, 3),
         checkpoint_every: int = 25, resume: bool = False, device: str = "cpu", atlas: Any = None,
         route: str = "auto", sheets: bool | Sequence[tuple[int, int]] = True, image_column: str | None = None,
         amp: str | None = None,
         progress: Callable[[str, int, int], None] | None = None) -> MinedResult | None:
    """Mine the top-k images of every (layer, head, mode, sign) over ``images`` (a folder, a file list,
    WebDataset shards or Parquet files: :func:`qkdissect.mining.sources.open_source`).

    ``sheet_modes``: modes (of every head) whose raw maps are kept and whose contact sheets are drawn (None: all
    modes). ``sheets``: draw the contact sheets (True), none (False: :func:`qkdissect.mining.add_sheets` draws
    them later), or only those of the given (layer, head) pairs. ``device``: cpu, cuda or cuda:N; ``amp``: None, "bf16" or "fp16" (the forward pass under autocast;
    projections and statistics stay float32/exact). ``progress(stage, done, total)`` is called after each batch
    with stage "mining" (images this process has read; total 0 while unknown), then per contact sheet with stage
    "sheets". Under torchrun (WORLD_SIZE > 1) each rank mines its block of units, rank 0 merges and writes; other
    ranks return None.
    """
    from qkdissect.decomposition import dissect
    from qkdissect.positional import refuse_windows

    started = time.perf_counter()
    loaded: LoadedModel = wrap_model(model)
    if loaded.adapter.modality != "image":
        raise QKDissectError(f"mine reads images; {loaded.spec} is a {loaded.adapter.modality} model.")
    if top_k < 1 or batch_size < 1 or checkpoint_every < 1:
        raise QKDissectError("--top, --batch-size and --checkpoint-every must be at least 1.")
    if amp is not None and amp not in AMP_DTYPES:
        raise QKDissectError(f"--amp must be one of {', '.join(AMP_DTYPES)} or none, got {amp!r}.")
    source = open_source(images, batch_size=batch_size, image_column=image_column)
    folder = MiningFolder(out)
    folder.check(resume)
    rank, world, device_, started_dist = _distributed(_device(device))
    try:
        if atlas is None:
            atlas = dissect(loaded, dtype="float64", null_samples=64)
        n_layers = atlas.n_layers
        layers = list(range(n_layers)) if layers is None else sorted(set(int(layer) for layer in layers))
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
        fingerprint = json.loads(json.dumps({
            "model": loaded.spec, "weights": weights_fingerprint(loaded.model),
            "atlas": tensors_digest({f"{i}.{n}": getattr(m, n) for i, m in enumerate(atlas.layers)
                                     for n in ("U", "S", "V")}),
            "source": source.kind, "images": source.fingerprint(), "units": len(source.units), "top_k": top_k,
            "batch_size": batch_size, "layers": layers, "map_modes": map_modes,
            "preprocessing": preprocessing.to_dict(), "amp": amp, "format_version": FORMAT_VERSION}))
        run = _Run(loaded, atlas, source, folder, fingerprint, layers, map_modes, grid, top_k, batch_size,
                   rank, world, device_)
        finished = folder.index()
        if resume and finished is not None:
            _compare(finished.get("fingerprint", {}), fingerprint, folder.out / "mined.json")
            _barrier(world)
            if rank == 0:
                folder.discard()  # a kill after mined.json was written leaves the stage behind
                return load_mined(folder.out)
            return None
        _barrier(world)
        if rank == 0:
            folder.claim()
        _barrier(world)  # the folder is claimed before any rank reads what an earlier run left
        staged = folder.staged_meta() if resume else None
        if staged is not None:
            _compare(staged.get("fingerprint", {}), fingerprint, folder.staged("mined.safetensors"))
        current = [] if staged is not None or not resume else run.current()
        generation = next_generation(folder.checkpoints)
        _barrier(world)  # every rank has looked at the folder before any rank writes into it
        if staged is None:
            loaded.model.to(device_)
            engine = MiningEngine(loaded, atlas, layers, top_k=top_k, map_modes=map_modes, grid=grid,
                                  device=device_, route=route, amp=amp)
            topk, stats, coverage, listings, seconds = run.mine(engine, current, generation, workers,
                                                                checkpoint_every, progress)
            if rank != 0:
                return None
            meta = run.index_document(engine.route_kinds, str(device_))
            folder.save_times({"mining_seconds": round(seconds, 3),
                               "images_per_second": round(int(stats.images) / max(seconds, 1e-9), 3)})
            stage_results(folder, listings, topk, stats, meta)
            remove_checkpoint_files(folder.checkpoints)
        elif rank != 0:
            return None
        from qkdissect.mining.sheets import draw_sheets

        meta = folder.staged_meta()
        result = _staged_result(folder, meta)
        save_atlas(atlas, folder.stage / "atlas")
        heads = None if sheets is True else list(sheets or [])
        meta["sheets"] = draw_sheets(result, folder.stage, progress=progress, workers=workers, heads=heads) \
            if sheets is True or heads else []
        meta.update(folder.load_times())
        meta["total_seconds"] = round(time.perf_counter() - started, 3)  # of this (last) call
        folder.finish(meta)
        return load_mined(folder.out)
    finally:
        if started_dist:
            import torch.distributed as dist

            dist.destroy_process_group()


def _staged_result(folder: MiningFolder, meta: dict[str, Any]) -> MinedResult:
    """The staged final state as a MinedResult (before mined.json exists), for drawing the sheets."""
    from safetensors.torch import load_file

    from qkdissect.mining.result import Listing
    from qkdissect.mining.state import stats_summary

    topk, stats = state_from_tensors(load_file(str(folder.staged("mined.safetensors"))))
    return MinedResult(directory=folder.out, meta=meta, layers=tuple(meta["layers"]), root=Path(meta["image_root"]),
                       image_paths=Listing(folder.staged("images.txt")), topk=topk,
                       stats={**stats_summary(stats), "tokens": stats.tokens, "images": stats.images},
                       map_modes=tuple(meta["map_modes"]), grid=tuple(meta["grid"]),
                       bad=tuple((b["path"], b["reason"]) for b in meta.get("bad_images", [])))


class _Run:
    """The state of one process of one mining run (see :func:`mine`)."""

    def __init__(self, loaded, atlas: ModeAtlas, source: ImageSource, folder: MiningFolder, fingerprint, layers, map_modes,
                 grid, top_k, batch_size, rank, world, device):
        self.loaded, self.atlas, self.source, self.folder = loaded, atlas, source, folder
        self.fingerprint, self.layers, self.map_modes, self.grid = fingerprint, layers, map_modes, grid
        self.top_k, self.batch_size, self.rank, self.world, self.device = top_k, batch_size, rank, world, device

    def current(self) -> list[tuple[Path, dict[str, Any]]]:
        """The current checkpoints, checked against this run's fingerprint."""
        found = current_checkpoints(self.folder.checkpoints)
        for path, meta in found:
            _compare(meta.get("fingerprint", {}), self.fingerprint, path)
        return found

    def mine(self, engine: MiningEngine, current, generation: int, workers: int, checkpoint_every: int,
             progress) -> tuple[TopK, RunningStats, Coverage, list, float]:
        """Mine this rank's pending units; rank 0 returns the merged state of every rank and checkpoint."""
        folder, source, rank = self.folder, self.source, self.rank
        covered = Coverage.union((Coverage.from_json(meta["coverage"]) for _, meta in current), folder.checkpoints)
        pending = [(u, start) for u in _block(rank, self.world, len(source.units))
                   if (start := covered.start_of(u)) is not None]
        map_index = torch.tensor(self.map_modes, dtype=torch.long)
        topk, stats = empty_state(len(self.layers), self.atlas.n_heads, self.atlas.rank, self.top_k,
                                  len(self.map_modes), self.grid[0] * self.grid[1], self.device)
        coverage, listings, absorbs, seconds = Coverage(), [], [], 0.0
        if rank == 0 and current:  # rank 0 carries every earlier checkpoint (exact merges: order is irrelevant)
            for path, meta in current:
                old_topk, old_stats, _ = load_checkpoint(path)
                topk = merge_topk(topk, old_topk.to(self.device), map_index)
                stats = merge_stats(stats, old_stats.to(self.device))
                listings.extend(tuple(item) for item in meta["listings"])
                seconds = max(seconds, float(meta.get("seconds", 0.0)))
            coverage, absorbs = covered, [path.name for path, _ in current]
        name = checkpoint_name(generation, rank)
        listing: ListingWriter | None = None
        sizes = [source.units[u].size for u, _ in pending]
        total = 0 if any(s is None for s in sizes) else sum(sizes) - sum(start for _, start in pending)
        position = dict(pending)
        loader = batch_loader(source, pending, self.batch_size, self.loaded.preprocessing, workers=workers,
                              pin_memory=self.device.type == "cuda")
        crash_after = int(os.environ.get(CRASH_HOOK, "0") or 0)
        done_batches, read, run_started = 0, 0, time.perf_counter()
        if progress is not None:
            progress("mining", 0, total)
        for batch in loader:
            unit, samples = batch["unit"], batch["samples"]
            if batch["pixels"] is not None:
                topk, stats = engine.step(batch["pixels"], batch["index"], topk, stats)
            if listing is None:
                listing = ListingWriter(folder.checkpoints / f"{name}.ids")
            listing.write(unit, samples)
            start = position[unit]
            position[unit] = start + len(samples)
            coverage.add(unit, start, position[unit], batch["last"])
            done_batches, read = done_batches + 1, read + len(samples)
            if done_batches % checkpoint_every == 0:
                self._checkpoint(name, topk, stats, coverage, listings + [(listing.name, listing.flush())], absorbs,
                                 seconds + time.perf_counter() - run_started)
                absorbs = []
            if progress is not None:
                progress("mining", read, max(total, read) if total else 0)
            if crash_after and done_batches >= crash_after:
                raise RuntimeError(f"{CRASH_HOOK}: simulated crash after {done_batches} batches")
        if listing is not None:
            listings.append((listing.name, listing.close()))
        seconds += time.perf_counter() - run_started
        topk, stats = topk.to("cpu"), stats.to("cpu")
        if self.world > 1:
            topk, stats, coverage, listings, seconds = self._gather(topk, stats, coverage, listings, seconds,
                                                                    map_index)
        if rank == 0 and not coverage.complete(len(source.units)):
            raise QKDissectError("internal: the mining run ended with units left unread.")
        return topk, stats, coverage, listings, seconds

    def _checkpoint(self, name: str, topk: TopK, stats: RunningStats, coverage: Coverage, listings: list,
                    absorbs: list[str], seconds: float) -> None:
        folder = self.folder.checkpoints
        save_checkpoint(folder / f"{name}.safetensors", topk, stats, {
            "fingerprint": self.fingerprint, "rank": self.rank, "world_size": self.world,
            "coverage": coverage.to_json(), "listings": [list(item) for item in listings],
            "absorbs": absorbs, "seconds": round(seconds, 3)})
        for old in absorbs:  # now inside this checkpoint: their states go (their listings stay, inherited)
            path = folder / old
            if path.is_file():
                path.unlink()

    def _gather(self, topk, stats, coverage, listings, seconds, map_index):
        import torch.distributed as dist

        payload = {"state": state_tensors(topk, stats), "coverage": coverage.to_json(), "listings": listings,
                   "seconds": seconds}
        gathered = [None] * self.world if self.rank == 0 else None
        dist.gather_object(payload, gathered, dst=0)
        if self.rank != 0:
            return topk, stats, coverage, listings, seconds
        coverages = [coverage]
        for other in gathered[1:]:
            other_topk, other_stats = state_from_tensors(other["state"])
            topk = merge_topk(topk, other_topk, map_index)
            stats = merge_stats(stats, other_stats)
            coverages.append(Coverage.from_json(other["coverage"]))
            listings = listings + [tuple(item) for item in other["listings"]]
            seconds = max(seconds, float(other["seconds"]))
        return topk, stats, Coverage.union(coverages, self.folder.checkpoints), listings, seconds

    def index_document(self, routes: list[str], device: str) -> dict[str, Any]:
        """mined.json without the counts (added from the listings), times and sheets: the same for every run of
        the same work, so that it can be stored with the final state."""
        from qkdissect.files import library_versions

        loaded, atlas, source = self.loaded, self.atlas, self.source
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "model": loaded.spec, "checkpoint": loaded.checkpoint,
            "random_init": bool(loaded.info.get("random_init", False)), "family": loaded.family,
            "fingerprint": self.fingerprint, "preprocessing": loaded.preprocessing.to_dict(),
            "prefix_tokens": list(loaded.adapter.prefix_tokens), "grid": list(self.grid), "layers": self.layers,
            "n_heads": atlas.n_heads, "rank": atlas.rank, "top_k": self.top_k, "signs": ["+", "-"], "score": SCORE,
            "map_modes": self.map_modes, "image_root": str(source.root.resolve()), "source": source.to_meta(),
            "routes": routes, "batch_size": self.batch_size, "world_size": self.world, "device": device,
            "amp": self.fingerprint["amp"], "versions": _versions(library_versions())}
