"""`qkdissect maps`, `rank` and `mine` end to end, on tiny models saved as folders."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers import N_HEADS, make_hf, make_timm_vit, text_batch
from typer.testing import CliRunner

from qkdissect import dissect, load_model
from qkdissect.adapters import wrap_model
from qkdissect.cli import app
from qkdissect.errors import QKDissectError
from qkdissect.images import open_image
from qkdissect.mining import load_mined
from qkdissect.projection import capture_attention_inputs, project
from qkdissect.views import head_maps, load_maps, load_rank, prepare_view, token_strings

runner = CliRunner()
TESTS = Path(__file__).parent
WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "park", "."]


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    """The tiny timm ViT saved as a timm folder (config.json with architecture + model.safetensors)."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tinyvit")
    model = make_timm_vit(seed=2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    args = dict(img_size=[40, 56], patch_size=8, embed_dim=24, depth=3, num_heads=4, qkv_bias=True, reg_tokens=2,
                mlp_ratio=1.5)
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "num_classes": 5,
                                                    "model_args": args}))
    return folder


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    """The tiny BERT saved with save_pretrained, with a word-piece tokenizer built from a vocab written here."""
    from transformers import BertTokenizerFast

    folder = tmp_path_factory.mktemp("tinybert")
    model = make_hf("bert", seed=4)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    vocab += [f"[unused{i}]" for i in range(model.config.vocab_size - len(vocab))]
    BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True).save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def images(natural_image_folder, tmp_path_factory):
    """Two good images and a broken one between them."""
    bad = tmp_path_factory.mktemp("bad") / "broken.jpg"
    bad.write_text("not an image")
    return [natural_image_folder / "astronaut.png", bad, natural_image_folder / "camera.png"]


def test_maps_writes_good_images_then_names_the_bad_one(vit_folder, images, tmp_path):
    out = tmp_path / "maps"
    result = runner.invoke(app, ["maps", str(vit_folder), *map(str, images), "--layer", "1", "--head", "2",
                                 "--modes", "0,3,5", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "broken.jpg" in result.output and "not an image" in result.output
    maps = load_maps(out)
    assert [Path(item.source).name for item in maps.items] == ["astronaut.png", "camera.png"]
    assert maps.failed[0]["source"].endswith("broken.jpg")
    # the stored maps are the dense projections of the model's attention input, prefix tokens dropped
    loaded = load_model(str(vit_folder))
    atlas = dissect(loaded, dtype="float64", null_samples=10)
    pixels = loaded.preprocessing(open_image(images[0]))[None]
    q, k = project(atlas, 1, capture_attention_inputs(loaded, pixels, [1])[1])
    item = maps.items[0]
    rows, cols = maps.meta["grid"]
    assert (rows, cols) == [5, 7] or (rows, cols) == (5, 7)
    expected_q = q[0, 2, 3:, [0, 3, 5]].T.reshape(3, rows, cols)
    torch.testing.assert_close(item.tensors["q"], expected_q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(item.tensors["k_prefix"], k[0, 2, :3, [0, 3, 5]].T, rtol=1e-5, atol=1e-6)
    contributions = item.tensors["contributions"]
    assert contributions.shape == (3, 3 + rows * cols, 3 + rows * cols)
    for name in ("crop", "tensors"):
        assert (out / item.entry[name]).is_file()
    assert sorted(item.entry["figures"]) == ["0", "3", "5"]
    shares = item.tensors["mode_shares"]
    assert shares.shape == (atlas.rank,)
    assert float(shares.sum() + item.tensors["bias_share"]) == pytest.approx(1.0, abs=1e-9)


def test_maps_best_sign_and_bad_arguments(vit_folder, images, tmp_path):
    ok = runner.invoke(app, ["maps", str(vit_folder), str(images[0]), "-l", "0", "--head", "1", "--modes", "0",
                             "--signs", "best", "--out", str(tmp_path / "m")])
    assert ok.exit_code == 0, ok.output
    for args, words in ((["--head", "9"], "head 9 does not exist"), (["--modes", "0-6"], "modes [6] do not exist"),
                        (["--text", "a cat"], "needs a text model")):
        bad = runner.invoke(app, ["maps", str(vit_folder), str(images[0]), "-l", "0", "--head", "1", *args,
                                  "--out", str(tmp_path / "x")])
        assert bad.exit_code == 2 and words in " ".join(bad.output.split()), bad.output


def test_text_maps_from_token_tensors_without_tokenizer(tmp_path):
    from qkdissect.overlays import plot_token_strip

    loaded = wrap_model(make_hf("bert", seed=4))
    ctx = prepare_view(loaded)
    batch = text_batch(2, tokens=9)
    maps = head_maps(ctx, batch, layer=2, head=3, modes=[0, 1, 5], token_mask=batch["attention_mask"].bool())
    q, k = project(ctx.atlas, 2, capture_attention_inputs(loaded, batch, [2])[2])
    torch.testing.assert_close(maps.q, q[:, 3][..., [0, 1, 5]].transpose(1, 2))
    torch.testing.assert_close(maps.k, k[:, 3][..., [0, 1, 5]].transpose(1, 2))
    scores, q_arg, _ = maps.scores()
    valid = batch["attention_mask"][1].bool()
    assert int(q_arg[1, 0, 0]) == int(torch.where(valid, q[1, 3, :, 0], -torch.inf).argmax())  # padding ignored
    tokens = token_strings(ctx, batch["input_ids"][0])
    assert tokens[0].startswith("#")  # no tokenizer: ids
    strip = plot_token_strip(tokens, maps.q[0].double().numpy(), maps.k[0].double().numpy(), maps.modes,
                             tmp_path / "strip.png", title="no tokenizer")
    assert strip.stat().st_size > 10_000
    with pytest.raises(QKDissectError, match="without a tokenizer"):
        loaded.adapter.tokenize(["a cat"])


def test_text_maps_cli_with_an_offline_tokenizer(bert_folder, tmp_path):
    out = tmp_path / "tmaps"
    result = runner.invoke(app, ["maps", str(bert_folder), "--text", "the cat sat on the mat", "--text", "a dog ran",
                                 "--layer", "2", "--head", "3", "--modes", "0-3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    maps = load_maps(out)
    first = maps.items[0]
    assert first.entry["tokens"] == ["[CLS]", "the", "cat", "sat", "on", "the", "mat", "[SEP]"]
    assert (out / first.entry["strip"]).is_file()
    loaded = load_model(str(bert_folder))
    atlas = dissect(loaded, dtype="float64", null_samples=10)
    tokens = loaded.adapter.tokenize(["the cat sat on the mat"])
    q, k = project(atlas, 2, capture_attention_inputs(loaded, tokens, [2])[2])
    torch.testing.assert_close(first.tensors["q"], q[0, 3, :, :4].T, rtol=1e-5, atol=1e-6)
    with open(out / first.entry["values_csv"]) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 * 8
    row = next(r for r in rows if r["mode"] == "2" and r["position"] == "2")
    assert row["token"] == "cat" and float(row["k"]) == pytest.approx(float(k[0, 3, 2, 2]), rel=1e-4, abs=1e-6)
    second = maps.items[1]  # shorter text: its own tokens, no padding
    assert second.entry["tokens"] == ["[CLS]", "a", "dog", "ran", "[SEP]"] and second.tensors["q"].shape == (4, 5)
    ranked = runner.invoke(app, ["rank", str(bert_folder), "--text", "the dog ran to the park", "-l", "1",
                                 "--out", str(tmp_path / "trank")])
    assert ranked.exit_code == 0, ranked.output
    rows = load_rank(tmp_path / "trank").rows
    assert len(rows) == N_HEADS * 6 and rows[0]["share"] == max(r["share"] for r in rows)
    refused = runner.invoke(app, ["maps", str(bert_folder), str(TESTS / "conftest.py"), "-l", "0", "--head", "0",
                                  "--out", str(tmp_path / "x")])
    assert refused.exit_code == 2 and "give --text" in refused.output


def test_rank_table_and_chart(vit_folder, images, natural_image_folder, tmp_path):
    out = tmp_path / "rank"
    result = runner.invoke(app, ["rank", str(vit_folder), str(images[0]), str(natural_image_folder / "coffee.png"),
                                 "--layer", "0-1", "--top", "6", "--out", str(out)])
    assert result.exit_code == 0, result.output
    ranked = load_rank(out)
    assert len(ranked.items) == 2 and all((out / item["figure"]).is_file() for item in ranked.items)
    rows = [r for r in ranked.rows if r["source"] == str(images[0])]
    assert len(rows) == 2 * N_HEADS * 6
    shares = [r["share"] for r in rows]
    assert shares == sorted(shares, reverse=True)
    assert [r["share"] for r in ranked.items[0]["top"]] == pytest.approx(shares[:6])
    for layer in (0, 1):
        for head in range(N_HEADS):
            head_rows = [r for r in rows if r["layer"] == layer and r["head"] == head]
            total = sum(r["share"] for r in head_rows) + head_rows[0]["head_bias_share"]
            assert total == pytest.approx(1.0, abs=1e-4)
    by_variance = runner.invoke(app, ["rank", str(vit_folder), str(images[0]), "-l", "2", "--by", "variance",
                                      "--patches-only", "--out", str(tmp_path / "r2")])
    assert by_variance.exit_code == 0, by_variance.output
    explained = [r["explained_variance"] for r in load_rank(tmp_path / "r2").rows]
    assert explained == sorted(explained, reverse=True)


def test_mine_cli_resume_and_help(vit_folder, natural_image_folder, tmp_path):
    out = tmp_path / "mined"
    args = ["mine", str(vit_folder), "--images", str(natural_image_folder), "--out", str(out), "--top", "2",
            "--batch-size", "2", "--workers", "0", "--sheets-modes", "0"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    result = load_mined(out)
    assert result.meta["n_processed"] == 5 and len(result.meta["sheets"]) == 3 * N_HEADS * 2
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--resume" in again.output
    resumed = runner.invoke(app, args + ["--resume"])
    assert resumed.exit_code == 0, resumed.output
    different = runner.invoke(app, args[:-2] + ["--sheets-modes", "0-1", "--resume"])
    assert different.exit_code == 2 and "map_modes" in different.output
    text = " ".join(runner.invoke(app, ["mine", "--help"]).output.split())
    for words in ("1×1", "50:1", "torchrun", "--resume", "bad_images.log"):
        assert words in text, words
