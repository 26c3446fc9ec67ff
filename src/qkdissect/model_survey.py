"""``qkdissect.survey()`` (module ``qkdissect.model_survey``): dissect a list of models into one folder and compare them over relative depth.

The paper's cross-model comparison in one call: every model is loaded by its spec, dissected, and saved as its own
atlas; a model that cannot be loaded or dissected is recorded with the reason while the others go on; the models
that succeeded are compared (:func:`qkdissect.comparison.compare`) and each one's early-vs-late trend
(:func:`qkdissect.comparison.depth_trend`) is tabulated. A survey resumes: a model whose atlas is already in the
folder is not loaded again; failed models are tried again.

Folder written (``out``)::

    survey.json        {"format": "qkdissect-survey", "format_version": 1, "files": ["trends.csv"], "created",
                        "updated", "versions",
                        "options": {fold_ln, dtype, null_samples, null_percentile, seed, random_init},
                        "planned": [{spec, label}] (the models of the survey, in order),
                        "models": [{spec, label, status: "done" | "failed", reason, atlas, seconds,
                                    family, n_layers, n_heads, trend}]}
    trends.csv         one row per done model: early / late mean C, slope over relative depth and its interval
    atlases/SLUG/      one atlas per done model (as `qkdissect dissect` writes it, figures included)
    compare/           the comparison of the done models (compare.json, compare.png: `qkdissect compare` format;
                       `qkdissect report ATLAS --compare OUT` reads it)

Every folder is owned as :mod:`qkdissect.outputs` says: survey.json lists the files of the survey folder itself,
each atlas folder and compare/ carry their own index; a non-empty folder that is not a survey is refused.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import io
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Literal, Sequence

from qkdissect.comparison import ComparedModel, Comparison, DepthTrend, compare
from qkdissect.decomposition import ModeAtlas, dissect
from qkdissect.errors import QKDissectError
from qkdissect.files import library_versions
from qkdissect.progress import ProgressFn

__all__ = ["DEFAULT_MODELS", "FORMAT", "FORMAT_VERSION", "SurveyEntry", "SurveyModel", "SurveyResult",
           "load_survey", "read_model_list", "survey"]

FORMAT, FORMAT_VERSION = "qkdissect-survey", 1
INDEX = "survey.json"
STEPS = 3  # per model: loaded, dissected, saved


@dataclass(frozen=True)
class SurveyModel:
    """A model to survey: its spec (as ``load_model`` takes it) and the label of its curve."""

    spec: str
    label: str


#: The paper's families (supervised ViT, DeiT, DINO, DINOv2 with and without registers, CLIP, MAE, BEiT) and
#: today's (DINOv3, EVA-02, SigLIP2, RoPE-ViT), all base size, as timm names (weights on the hub as timm/NAME).
DEFAULT_MODELS: tuple[SurveyModel, ...] = (
    SurveyModel("timm:vit_base_patch16_224.augreg2_in21k_ft_in1k", "ViT-B/16 (supervised)"),
    SurveyModel("timm:deit_base_patch16_224.fb_in1k", "DeiT-B/16"),
    SurveyModel("timm:vit_base_patch16_224.dino", "DINO ViT-B/16"),
    SurveyModel("timm:vit_base_patch14_dinov2.lvd142m", "DINOv2 ViT-B/14"),
    SurveyModel("timm:vit_base_patch14_reg4_dinov2.lvd142m", "DINOv2 ViT-B/14 + registers"),
    SurveyModel("timm:vit_base_patch16_clip_224.openai", "CLIP ViT-B/16"),
    SurveyModel("timm:vit_base_patch16_224.mae", "MAE ViT-B/16"),
    SurveyModel("timm:beit_base_patch16_224.in22k_ft_in22k_in1k", "BEiT-B/16"),
    SurveyModel("timm:vit_base_patch16_dinov3.lvd1689m", "DINOv3 ViT-B/16"),
    SurveyModel("timm:eva02_base_patch14_224.mim_in22k", "EVA-02-B/14"),
    SurveyModel("timm:vit_base_patch16_siglip_224.v2_webli", "SigLIP2 ViT-B/16"),
    SurveyModel("timm:vit_base_patch16_rope_mixed_224.naver_in1k", "RoPE-ViT-B/16 (mixed)"),
)


@dataclass(frozen=True)
class SurveyEntry:
    """One model of a survey: ``status`` "done" (its atlas is ``out / atlas``) or "failed" (``reason``)."""

    spec: str
    label: str
    status: Literal["done", "failed"]
    reason: str = ""
    atlas: str = ""
    seconds: float = 0.0
    family: str = ""
    n_layers: int = 0
    n_heads: int = 0
    trend: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass(frozen=True)
class SurveyResult:
    """What :func:`survey` did: every entry (in order), which were skipped as already done, the comparison of the
    done models with their trends (label -> :class:`DepthTrend`), and the files of the survey folder."""

    out: Path
    entries: tuple[SurveyEntry, ...]
    skipped: tuple[str, ...]
    comparison: Comparison | None
    trends: dict[str, DepthTrend] = field(default_factory=dict)

    @property
    def done(self) -> tuple[SurveyEntry, ...]:
        return tuple(entry for entry in self.entries if entry.status == "done")

    @property
    def failed(self) -> tuple[SurveyEntry, ...]:
        return tuple(entry for entry in self.entries if entry.status == "failed")


# ----- the model list -------------------------------------------------------------------------------------------
def default_label(spec: str) -> str:
    """The label of ``spec``: the default list's label, else the spec without its prefix (a folder: its name)."""
    for model in DEFAULT_MODELS:
        if model.spec == spec:
            return model.label
    for prefix in ("timm:", "hf:", "builtin:"):
        if spec.startswith(prefix):
            return spec[len(prefix):]
    return Path(spec).name or spec


def read_model_list(path: str | os.PathLike) -> list[str]:
    """The model specs of a text file: one per line; blank lines and ``#`` comments (whole line, or after
    whitespace) are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QKDissectError(f"--models {path} not found; give a text file with one model spec per line.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise QKDissectError(f"--models {path} cannot be read ({error}); give a UTF-8 text file with one model "
                             "spec per line.") from None
    specs = [re.split(r"\s#", line, maxsplit=1)[0].strip() for line in text.splitlines()]
    specs = [spec for spec in specs if spec and not spec.startswith("#")]
    if not specs:
        raise QKDissectError(f"--models {path} lists no model; write one spec per line (e.g. timm:vit_base_patch16_224.dino).")
    return specs


def _slug(spec: str, taken: set[str]) -> str:
    """A folder name for ``spec`` under atlases/, distinct from ``taken``."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", spec).strip("._-")[:80] or "model"
    return base if base not in taken else f"{base}-{hashlib.sha1(spec.encode()).hexdigest()[:8]}"


# ----- survey.json ----------------------------------------------------------------------------------------------
def load_survey(folder: str | os.PathLike) -> dict[str, Any]:
    """The validated ``survey.json`` document of a survey folder (schema: :mod:`qkdissect.formats.survey`);
    QKDissectError naming the file and the field for anything else."""
    from qkdissect.formats import read_document
    from qkdissect.formats.survey import SurveyDocument

    document, _ = read_document(Path(folder) / INDEX, SurveyDocument,
                                missing=f"{folder} is not a survey folder",
                                remedy="run `qkdissect survey --out DIR` into a new folder", kind=FORMAT,
                                max_version=FORMAT_VERSION)
    return document


def _previous(out: Path) -> dict[str, Any] | None:
    """The previous survey in ``out`` (None when ``out`` is new or empty); any other folder is refused
    (:mod:`qkdissect.outputs`: a non-empty folder without a survey.json listing its files is not touched)."""
    from qkdissect.outputs import check_out

    check_out(out, FORMAT, INDEX)
    return load_survey(out) if (out / INDEX).is_file() else None


def _write_index(out: Path, options: dict[str, Any], planned: Sequence[SurveyModel], entries: Sequence[SurveyEntry],
                 created: str) -> None:
    """survey.json (the index, written last) and trends.csv, through :class:`qkdissect.outputs.OutputFolder`."""
    from qkdissect.outputs import OutputFolder

    with OutputFolder(out, FORMAT, INDEX, noun="survey").claim(replace=True) as folder:
        (folder.staging / "trends.csv").write_text(_trend_csv(entries), encoding="utf-8")
        folder.finish({"format_version": FORMAT_VERSION, "created": created,
                       "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": library_versions(),
                       "options": options, "planned": [vars(model) for model in planned],
                       "models": [entry.to_json() for entry in entries]})


def _trend_csv(entries: Sequence[SurveyEntry]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["label", "spec", "family", "n_layers", "n_heads", "early_mean_C", "late_mean_C", "slope",
                     "slope_low", "slope_high", "level", "direction", "atlas"])
    for entry in entries:
        if entry.status == "done" and entry.trend is not None:
            t = entry.trend
            number = (lambda v: "" if v is None else f"{v:.6f}")
            writer.writerow([entry.label, entry.spec, entry.family, entry.n_layers, entry.n_heads,
                             number(t["early"]), number(t["late"]), number(t["slope"]), number(t["low"]),
                             number(t["high"]), t["level"], t["direction"], entry.atlas])
    return buffer.getvalue()


# ----- one model ------------------------------------------------------------------------------------------------
def _survey_one(model: SurveyModel, folder: Path, options: dict[str, Any], device: Any,
                loader: Callable[..., Any], step: Callable[[int], None]) -> tuple[str, str]:
    """Load, dissect and save one model into ``folder``; returns (status, reason)."""
    from qkdissect.plots import plot_layer_similarity, plot_mode_cosines

    loaded = None
    try:
        loaded = loader(model.spec, random_init=options["random_init"])
        step(1)
        atlas = dissect(loaded, fold_ln=options["fold_ln"], dtype=options["dtype"], device=device,
                        null_samples=options["null_samples"], null_percentile=options["null_percentile"],
                        seed=options["seed"])
        step(2)
        atlas.save(folder, extra=lambda staging: (plot_layer_similarity(atlas, staging / "layer_similarity.png"),
                                                  plot_mode_cosines(atlas, staging / "mode_cosines.png")))
        return "done", ""
    except QKDissectError as error:
        return "failed", str(error)
    except Exception as error:  # noqa: BLE001 — one model's crash must not stop the others; the reason is kept
        return "failed", f"unexpected {type(error).__name__}: {error}"
    finally:
        if loaded is not None:  # free the model's memory before the next one (a collection costs ~0.5 s)
            del loaded
            gc.collect()


def _done_atlas(out: Path, entry: SurveyEntry | None) -> ModeAtlas | None:
    """The atlas of an entry recorded as done, when it is still there and readable."""
    if entry is None or entry.status != "done" or not entry.atlas:
        return None
    try:
        return ModeAtlas.load(out / entry.atlas)
    except QKDissectError:
        return None


def _entry(model: SurveyModel, status: str, reason: str, atlas: str, seconds: float,
           loaded_atlas: ModeAtlas | None, trend_samples: int, seed: int) -> SurveyEntry:
    if loaded_atlas is None:
        return SurveyEntry(model.spec, model.label, "failed", reason, "", round(seconds, 3))  # type: ignore[arg-type]
    trend = ComparedModel.from_atlas(loaded_atlas, model.label).trend(samples=trend_samples, seed=seed)
    return SurveyEntry(model.spec, model.label, "done", "", atlas, round(seconds, 3),
                       str(loaded_atlas.meta.get("family", "?")), loaded_atlas.n_layers, loaded_atlas.n_heads,
                       {**trend.to_json(), "direction": trend.direction})


def survey(
    models: Sequence[str | SurveyModel] | None = None,
    out: str | os.PathLike = "survey",
    *,
    fold_ln: bool = False,
    dtype: str = "float32",
    device: str | None = None,
    null_samples: int = 1000,
    null_percentile: float = 99.0,
    seed: int = 0,
    random_init: bool = False,
    trend_samples: int = 2000,
    progress: ProgressFn | None = None,
    loader: Callable[..., Any] | None = None,
) -> SurveyResult:
    """Dissect ``models`` (specs or :class:`SurveyModel`) into ``out`` and compare them over relative depth.

    ``models=None``: the models of the survey already in ``out`` (resume), else :data:`DEFAULT_MODELS`. Models
    given to a survey that already exists are added to it. Each model is loaded (``loader``, default
    :func:`qkdissect.load_model`), dissected with the options (``fold_ln`` … ``seed`` as in :func:`dissect`;
    the same options as the survey already in ``out``, else QKDissectError) and saved in ``out/atlases/SLUG``;
    a failure is recorded with its reason and the next model goes on. Done models are skipped on a re-run.
    ``progress(stage, done, total)``: stage "models" (models finished of all), and one stage per model label
    (0..3: loaded, dissected, saved). The trends use ``trend_samples`` bootstrap resamplings of the heads.

    Returns a :class:`SurveyResult`; QKDissectError when no model succeeded (survey.json still records why).
    """
    if loader is None:
        from qkdissect.adapters import load_model as loader
    if dtype not in ("float32", "float64"):
        raise QKDissectError(f"dtype must be float32 or float64, got {dtype!r}.")
    if null_samples < 2 or not 0 < null_percentile < 100 or trend_samples < 1:
        raise QKDissectError(f"need null_samples ≥ 2, 0 < null_percentile < 100 and trend_samples ≥ 1; got "
                             f"{null_samples}, {null_percentile} and {trend_samples}.")
    out = Path(out)
    previous = _previous(out)
    options = {"fold_ln": bool(fold_ln), "dtype": str(dtype), "null_samples": int(null_samples),
               "null_percentile": float(null_percentile), "seed": int(seed), "random_init": bool(random_init)}
    old: dict[str, SurveyEntry] = {}
    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if previous is not None:
        if previous["options"] != options:
            changed = ", ".join(f"{key}={previous['options'].get(key)!r}" for key in options
                                if previous["options"].get(key) != options[key])
            raise QKDissectError(f"{out} is a survey made with other options ({changed}); re-run with those "
                                 "options to resume it, or choose another --out.")
        created = str(previous.get("created", created))
        for item in previous["models"]:
            fields = {name: item[name] for name in SurveyEntry.__dataclass_fields__ if name in item}
            old[item["spec"]] = SurveyEntry(**fields)
    planned = [SurveyModel(str(item["spec"]), str(item["label"])) for item in (previous or {}).get("planned", [])]
    known = [SurveyModel(e.spec, e.label) for e in old.values()] + planned
    if models is None:
        todo = known or list(DEFAULT_MODELS)
    else:
        given = [m if isinstance(m, SurveyModel) else SurveyModel(str(m), default_label(str(m))) for m in models]
        if not given:
            raise QKDissectError("no model to survey; give model specs, or none for the default list.")
        todo = known + [m for m in given if m.spec not in {k.spec for k in known}]
    todo = list({model.spec: model for model in reversed(todo)}.values())[::-1]  # first occurrence of each spec
    labels: set[str] = set()
    for index, model in enumerate(todo):  # distinct labels: the comparison's legend
        label, counter = model.label, 2
        while label in labels:
            label, counter = f"{model.label} ({counter})", counter + 1
        labels.add(label)
        todo[index] = SurveyModel(model.spec, label)
    report = progress or (lambda stage, done, total: None)
    slugs = {PurePosixPath(e.atlas).name for e in old.values() if e.atlas}
    entries: dict[str, SurveyEntry] = dict(old)
    skipped: list[str] = []
    atlases: dict[str, ModeAtlas] = {}
    _write_index(out, options, todo, list(old.values()), created)  # a killed run resumes this list
    report("models", 0, len(todo))
    for position, model in enumerate(todo):
        report(model.label, 0, STEPS)
        previous_entry = old.get(model.spec)
        atlas = _done_atlas(out, previous_entry)
        if atlas is not None:
            skipped.append(model.spec)
            entries[model.spec] = _entry(model, "done", "", previous_entry.atlas, previous_entry.seconds, atlas,
                                         trend_samples, seed)
        else:
            if previous_entry is not None and previous_entry.atlas:
                relative = previous_entry.atlas
            else:
                relative = f"atlases/{_slug(model.spec, slugs)}"
                slugs.add(PurePosixPath(relative).name)
            started = time.perf_counter()
            status, reason = _survey_one(model, out / relative, options, device, loader,
                                         lambda done, label=model.label: report(label, done, STEPS))
            atlas = ModeAtlas.load(out / relative) if status == "done" else None
            entries[model.spec] = _entry(model, status, reason, relative, time.perf_counter() - started, atlas,
                                         trend_samples, seed)
        if atlas is not None:
            atlases[model.spec] = atlas
        _write_index(out, options, todo, [entries[m.spec] for m in todo if m.spec in entries], created)
        report(model.label, STEPS, STEPS)
        report("models", position + 1, len(todo))
    ordered = tuple(entries[m.spec] for m in todo)
    if not atlases:
        first = ordered[0]
        raise QKDissectError(f"none of the {len(ordered)} models could be surveyed (first: {first.spec}: "
                             f"{first.reason}); every reason is in {out / INDEX}.")
    done = [entry for entry in ordered if entry.status == "done"]
    comparison = _compare([atlases[entry.spec] for entry in done], [entry.label for entry in done],
                          [entry.atlas for entry in done])
    comparison.save(out / "compare")
    trends = {model.label: model.trend(samples=trend_samples, seed=seed) for model in comparison.models}
    return SurveyResult(out=out, entries=ordered, skipped=tuple(skipped), comparison=comparison, trends=trends)


def _compare(atlases: list[ModeAtlas], labels: list[str], sources: list[str]) -> Comparison:
    """:func:`compare` of the done models (one model: a comparison of one), with their atlas folders as sources."""
    if len(atlases) >= 2:
        comparison = compare(atlases, labels)
    else:
        comparison = Comparison(models=(ComparedModel.from_atlas(atlases[0], labels[0]),),
                                meta={"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                      "versions": library_versions()})
    models = tuple(replace(model, atlas=f"../{source}") for model, source in zip(comparison.models, sources))
    return Comparison(models=models, meta=comparison.meta)
