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
    for i, row in enumerate(trainer.val_dataset):
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
    del config["prefix_tokens"]
    (old / "config.json").write_text(json.dumps(config))
    assert main(["predict", str(old), str(images)]) == 2
    err = capsys.readouterr().err
    assert "incompatible mmtrain version" in err and "some_future_field" in err and "prefix_tokens" in err
    shutil.copytree(model_dir, tmp_path / "resized")
    config = json.loads((tmp_path / "resized" / "config.json").read_text())
    config["latent_dim"] = 48
    (tmp_path / "resized" / "config.json").write_text(json.dumps(config))
    assert main(["predict", str(tmp_path / "resized"), str(images)]) == 2
    assert "do not load" in capsys.readouterr().err
