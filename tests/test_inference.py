"""Using an exported model: load, predict (caption + reconstruction PNGs), retrieve, bad input."""

import json
import shutil

import pytest
import torch
from conftest import tiny_config
from PIL import Image

from mmtrain.cli import main
from mmtrain.inference import embed_captions, embed_images, find_images, load_pretrained, predict, top_k
from mmtrain.model import MultimodalModel
from mmtrain.trainer import Trainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny preset trained long enough for captions and retrieval to mean something, and its
    validation images written out as PNG files with their captions."""
    out = tmp_path_factory.mktemp("inference") / "run"
    # 1920 training engravings x 6 epochs (~25 s): enough to generalise to the 32 val images.
    trainer = Trainer(tiny_config(out, **{"data.synthetic_train_size": 1920, "train.epochs": 6,
                                          "train.batch_size": 32, "optim.warmup_steps": 5,
                                          "wandb.mode": "disabled", "wandb.media_samples": 0}))
    trainer.fit()
    images = out.parent / "val_images"
    images.mkdir()
    captions = {}
    for i, row in enumerate(trainer.data.val):
        path = images / f"val_{i:03d}.png"
        row["image"].save(path)
        captions[str(path)] = row["caption"]
    from conftest import reset_accelerate

    reset_accelerate()
    return out / "model", images, captions


def test_export_loads_in_one_call_with_identical_outputs(trained):
    model_dir = trained[0]
    model, tokenizer = load_pretrained(model_dir)
    assert len(tokenizer) == model.config.vocab_size
    again = MultimodalModel.from_pretrained(str(model_dir)).eval()
    x = torch.rand(3, 1, 32, 32)
    assert torch.equal(model.image_encoder(x), again.image_encoder(x))
    card = (model_dir / "README.md").read_text()
    assert "MultimodalModel.from_pretrained" in card and "AutoTokenizer.from_pretrained" in card
    assert "| `train_samples` | 1920 |" in card and "final_validation_loss" in card and "val/i2t_R@1" in card


def test_predict_writes_captions_pngs_and_jsonl(trained, tmp_path, capsys):
    model_dir, images, _ = trained
    picked = sorted(images.iterdir())[:5]
    out = tmp_path / "pred"
    assert main(["predict", str(model_dir), *map(str, picked), "--out", str(out), "--batch-size", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["path"] for r in records] == [str(p) for p in picked]
    for record in records:
        assert record["caption"].startswith("an engraving of")
        assert 0 <= record["reconstruction_mse"] < 0.2
        for kind in ("reconstruction", "difference", "comparison"):
            with Image.open(record[kind]) as png:
                assert png.size[0] >= 32


def test_captions_mostly_match_the_ground_truth(trained):
    """Greedy captions of the 32 unseen val images, word by word at the same position
    (measured: 0.59 of ground-truth words)."""
    model_dir, images, captions = trained
    model, tokenizer = load_pretrained(model_dir)
    records, failures = predict(model, tokenizer, sorted(images.iterdir()), None, progress=False)
    assert not failures and len(records) == 32
    hits = total = 0
    for record in records:
        truth, said = captions[record["path"]].split(), record["caption"].split()
        hits += sum(a == b for a, b in zip(truth, said, strict=False))
        total += len(truth)
    assert hits / total > 0.5, (hits, total)


def test_retrieve_finds_the_image_of_its_own_caption(trained):
    """Each val caption as a query over the 32 val images (measured top-1 rate: 0.72; chance 0.03)."""
    model_dir, images, captions = trained
    model, tokenizer = load_pretrained(model_dir)
    paths, failures = find_images([images])
    kept, keys, bad = embed_images(model, paths)
    assert not failures and not bad and len(kept) == 32
    queries = [captions[str(p)] for p in kept]
    ranked = top_k(embed_captions(model, tokenizer, queries), keys, 1)
    # Identical captions are interchangeable: a hit is any image carrying the queried caption.
    hits = sum(captions[str(kept[r[0][0]])] == q for q, r in zip(queries, ranked, strict=True))
    assert hits / len(queries) > 0.5, hits


def test_retrieve_cli_both_directions(trained, tmp_path, capsys):
    model_dir, images, captions = trained
    first = sorted(images.iterdir())[0]
    assert main(["retrieve", str(model_dir), "--images", str(images), "--query", captions[str(first)],
                 "--top", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["query"] == captions[str(first)] and len(result["results"]) == 3
    pool = tmp_path / "captions.txt"
    pool.write_text("\n".join(sorted(set(captions.values()))))
    assert main(["retrieve", str(model_dir), "--image", str(first), "--captions", str(pool), "--top", "2",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["query"] == str(first) and len(result["results"]) == 2
    assert all(r["match"] in captions.values() for r in result["results"])


def test_bad_images_are_reported_and_the_rest_processed(trained, tmp_path, capsys):
    model_dir, images, _ = trained
    good = sorted(images.iterdir())[:2]
    (tmp_path / "notes.png").write_text("not an image")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good[0].read_bytes()[:60])
    code = main(["predict", str(model_dir), str(good[0]), str(tmp_path / "notes.png"), str(truncated),
                 str(tmp_path / "missing.png"), str(good[1])])
    captured = capsys.readouterr()
    assert code == 2
    assert len(captured.out.strip().splitlines()) == 2  # both good images still captioned
    for name in ("notes.png", "cut.png", "missing.png"):
        assert name in captured.err
    assert "Traceback" not in captured.err


def test_missing_or_incompatible_model_dir(trained, tmp_path, capsys):
    model_dir, images, _ = trained
    assert main(["predict", str(tmp_path / "nowhere"), str(images)]) == 2
    assert "does not exist" in capsys.readouterr().err
    old = tmp_path / "old_model"
    shutil.copytree(model_dir, old)
    config = json.loads((old / "config.json").read_text())
    config["some_future_field"] = 1
    (old / "config.json").write_text(json.dumps(config))
    assert main(["predict", str(old), str(images)]) == 2
    err = capsys.readouterr().err
    assert "incompatible mmtrain version" in err and "unknown fields: some_future_field" in err
    shutil.copytree(model_dir, tmp_path / "resized")
    config = json.loads((tmp_path / "resized" / "config.json").read_text())
    config["latent_dim"] = 48
    (tmp_path / "resized" / "config.json").write_text(json.dumps(config))
    assert main(["predict", str(tmp_path / "resized"), str(images)]) == 2
    assert "do not load" in capsys.readouterr().err


def test_a_model_exported_before_a_field_existed_loads_with_its_default(trained, tmp_path, capsys):
    """config.json of a model exported before image_background existed: the field takes its default
    (white, what every model was trained with before), and predict runs."""
    model_dir, images, _ = trained
    old = tmp_path / "before_background"
    shutil.copytree(model_dir, old)
    config = json.loads((old / "config.json").read_text())
    assert config.pop("image_background") == "white"
    (old / "config.json").write_text(json.dumps(config))
    model, _ = load_pretrained(old)
    assert model.config.image_background == "white"
    first = sorted(images.iterdir())[0]
    assert main(["predict", str(old), str(first)]) == 0
    assert capsys.readouterr().out.startswith(str(first))


# --- retrieve --captions reads metadata as training does -------------------------------------------------


def _retrieve_captions(model_dir, image, captions_file, capsys):
    code = main(["retrieve", str(model_dir), "--image", str(image), "--captions", str(captions_file),
                 "--top", "3", "--json"])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured


def test_retrieve_reads_metadata_saved_with_a_bom(trained, tmp_path, capsys):
    """Notepad and PowerShell save UTF-8 with a byte-order mark. Training reads such metadata.jsonl and
    metadata.csv fine (datasets' readers); retrieve used to fail on both (a JSONDecodeError traceback;
    "no 'caption' column" for a csv whose first column is caption)."""
    model_dir, images, captions = trained
    first = sorted(images.iterdir())[0]
    pool = sorted(set(captions.values()))
    jsonl = tmp_path / "metadata.jsonl"
    jsonl.write_text("".join(json.dumps({"file_name": f"{i}.png", "caption": c}) + "\n" for i, c in enumerate(pool)),
                     encoding="utf-8-sig")
    csv = tmp_path / "metadata.csv"  # Excel style: BOM, caption first, quoted fields, CRLF
    csv.write_text("caption,file_name\r\n" + "".join(f'"{c}",{i}.png\r\n' for i, c in enumerate(pool)),
                   encoding="utf-8-sig", newline="")
    for file in (jsonl, csv):
        assert file.read_bytes().startswith(b"\xef\xbb\xbf")
        code, captured = _retrieve_captions(model_dir, first, file, capsys)
        assert code == 0, captured.err
        result = json.loads(captured.out)
        assert result["query"] == str(first) and len(result["results"]) == 3
        assert all(r["match"] in pool for r in result["results"]), result


def test_a_malformed_captions_file_is_one_line_naming_file_and_line(trained, tmp_path, capsys):
    model_dir, images, _ = trained
    first = sorted(images.iterdir())[0]
    jsonl = tmp_path / "metadata.jsonl"
    jsonl.write_text('{"caption": "a circle"}\n\n{"caption": "a square",}\n')
    csv = tmp_path / "metadata.csv"
    csv.write_text("caption,file_name\na circle,a.png\na square,b.png,extra\n")
    for file, where in ((jsonl, "line 3 is not valid JSON"), (csv, "line 3")):
        code, captured = _retrieve_captions(model_dir, first, file, capsys)
        lines = captured.err.strip().splitlines()
        assert code == 2 and len(lines) == 1, captured.err
        assert lines[0].startswith(f"mmtrain: error: --captions {str(file)!r}: ") and where in lines[0], lines[0]


def test_caption_rows_that_are_not_text_are_named_and_the_rest_ranked(trained, tmp_path, capsys):
    model_dir, images, captions = trained
    first = sorted(images.iterdir())[0]
    good = sorted(set(captions.values()))[:3]
    jsonl = tmp_path / "metadata.jsonl"
    jsonl.write_text(f'{{"caption": "{good[0]}"}}\n{{"caption": 7}}\n{{"caption": "{good[1]}"}}\n'
                     f'{{"caption": "  "}}\n{{"file_name": "x.png"}}\n{{"caption": "{good[2]}"}}\n')
    code, captured = _retrieve_captions(model_dir, first, jsonl, capsys)
    assert code == 2
    assert sorted(r["match"] for r in json.loads(captured.out)["results"]) == sorted(good)
    assert captured.err.strip().splitlines() == [
        f"mmtrain: error: {jsonl}: line 2: 'caption' is 7, not text; skipped",
        f"mmtrain: error: {jsonl}: line 4: 'caption' is missing or empty; skipped",
        f"mmtrain: error: {jsonl}: line 5: 'caption' is missing or empty; skipped",
    ]


# --- any decoder failure is one file's failure -----------------------------------------------------------


def test_any_exception_a_decoder_raises_is_one_files_failure(trained, tmp_path, capsys, monkeypatch):
    """Not only OSError: a plugin that raises RuntimeError for one file, and Pillow's decompression-bomb
    guard (DecompressionBombError is not an OSError), used to stop predict and retrieve with a traceback."""
    from PIL import PngImagePlugin

    model_dir, images, captions = trained
    good = sorted(images.iterdir())[:2]
    crash = tmp_path / "crash.png"
    shutil.copy(good[0], crash)
    Image.new("L", (64, 64), 128).save(tmp_path / "bomb.png")
    Image.new("L", (64, 64), 128).save(tmp_path / "big.jpg")
    original = PngImagePlugin.PngImageFile.load

    def load(self):
        name = self.filename or getattr(self.fp, "name", "")
        if str(name).endswith("crash.png"):
            raise RuntimeError("decoder bug")
        return original(self)

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", load)
    # 32x32 val images (1,024 pixels) pass; 64x64 (4,096) is over twice the limit: Pillow raises.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1100)
    inputs = [str(good[0]), str(crash), str(tmp_path / "bomb.png"), str(tmp_path / "big.jpg"), str(good[1])]
    assert main(["predict", str(model_dir), *inputs]) == 2
    captured = capsys.readouterr()
    # The JPEG is decoded at 1/2 scale (libjpeg DCT scaling), under the limit: it is captioned.
    assert [line.split("\t")[0] for line in captured.out.strip().splitlines()] == \
        [str(good[0]), str(tmp_path / "big.jpg"), str(good[1])]
    errors = captured.err.strip().splitlines()
    assert errors == [f"mmtrain: error: {crash}: cannot be read as an image: decoder bug",
                      f"mmtrain: error: {tmp_path / 'bomb.png'}: cannot be read as an image: too large to decode "
                      "safely (Image size (4096 pixels) exceeds limit of 2200 pixels, could be decompression bomb "
                      "DOS attack.); downscale the file"], captured.err
    assert main(["retrieve", str(model_dir), "--images", *inputs, "--query", captions[str(good[0])],
                 "--json"]) == 2
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)["results"]) == 3
    assert len(captured.err.strip().splitlines()) == 2 and "Traceback" not in captured.err
