"""Data sources through `datasets`, splits, transforms and loaders."""

import json
import time

import pytest
import torch
from datasets import Dataset, DatasetDict
from PIL import Image

from mmtrain.config import DataConfig, ModelConfig
from mmtrain.data import build_dataloader, load_splits, make_transform
from mmtrain.errors import DataError
from mmtrain.tokenizer import build_tokenizer

MODEL = ModelConfig(image_size=32, image_channels=3, image_encoder_layers=2, max_caption_length=12)


def _write_images(folder, n, size=40):
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"img_{i}.png"
        Image.new("RGB", (size, size + i), (i * 20 % 255, 100, 200)).save(folder / name)
        names.append(name)
    return names


def test_imagefolder_with_metadata_jsonl_and_custom_caption_column(tmp_path):
    names = _write_images(tmp_path / "imgs", 10)
    with (tmp_path / "imgs" / "metadata.jsonl").open("w") as f:
        for i, name in enumerate(names):
            f.write(json.dumps({"file_name": name, "text": f"picture number {i}"}) + "\n")
    cfg = DataConfig(source="imagefolder", path=str(tmp_path / "imgs"), caption_column="text", val_fraction=0.2)
    train, val = load_splits(cfg, MODEL)
    assert (len(train), len(val)) == (8, 2)
    assert train.column_names == ["image", "caption"]
    assert sorted(list(train["caption"]) + list(val["caption"])) == sorted(f"picture number {i}" for i in range(10))
    again_train, _ = load_splits(cfg, MODEL)
    assert list(again_train["caption"]) == list(train["caption"])  # seeded split
    other, _ = load_splits(DataConfig(source="imagefolder", path=str(tmp_path / "imgs"), caption_column="text",
                                      val_fraction=0.2, split_seed=1), MODEL)
    assert list(other["caption"]) != list(train["caption"])


def test_imagefolder_with_metadata_csv(tmp_path):
    names = _write_images(tmp_path / "imgs", 6)
    (tmp_path / "imgs" / "metadata.csv").write_text(
        "file_name,caption\n" + "".join(f"{n},a thing {i}\n" for i, n in enumerate(names)))
    train, val = load_splits(DataConfig(source="imagefolder", path=str(tmp_path / "imgs"), val_fraction=0.5), MODEL)
    assert len(train) + len(val) == 6 and isinstance(train[0]["image"], Image.Image)


def test_save_to_disk_with_validation_split(tmp_path):
    img = Image.new("L", (32, 32), 128)
    DatasetDict({
        "train": Dataset.from_dict({"picture": [img] * 5, "desc": [f"train {i}" for i in range(5)]}),
        "validation": Dataset.from_dict({"picture": [img] * 3, "desc": [f"val {i}" for i in range(3)]}),
    }).cast_column("picture", __import__("datasets").Image()).save_to_disk(str(tmp_path / "ds"))
    cfg = DataConfig(source="disk", path=str(tmp_path / "ds"), image_column="picture", caption_column="desc")
    train, val = load_splits(cfg, MODEL)
    assert list(train["caption"]) == [f"train {i}" for i in range(5)]
    assert list(val["caption"]) == [f"val {i}" for i in range(3)]


def test_missing_caption_column_names_it_and_lists_columns(tmp_path):
    names = _write_images(tmp_path / "imgs", 4)
    with (tmp_path / "imgs" / "metadata.jsonl").open("w") as f:
        for name in names:
            f.write(json.dumps({"file_name": name, "text": "x"}) + "\n")
    with pytest.raises(DataError) as err:
        load_splits(DataConfig(source="imagefolder", path=str(tmp_path / "imgs")), MODEL)
    msg = str(err.value)
    assert "'caption'" in msg and "data.caption_column" in msg and "text" in msg


def test_empty_caption_is_refused(tmp_path):
    img = Image.new("L", (32, 32))
    Dataset.from_dict({"image": [img] * 3, "caption": ["ok", "  ", "fine"]}).cast_column(
        "image", __import__("datasets").Image()).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"row 1.*empty"):
        load_splits(DataConfig(source="disk", path=str(tmp_path / "ds")), MODEL)


def test_hub_offline_fails_fast_with_advice():
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        load_splits(DataConfig(source="hub", path="someone/engravings"), MODEL)
    assert time.monotonic() - start < 60
    assert "someone/engravings" in str(err.value) and "save_to_disk" in str(err.value)


@pytest.mark.parametrize("channels", [1, 3])
def test_transform_and_loader_shapes(channels):
    model = ModelConfig(image_size=32, image_channels=channels, image_encoder_layers=2, max_caption_length=12)
    ds = Dataset.from_dict({"image": [Image.new("RGB", (50, 40), (255, 0, 0))] * 5,
                            "caption": ["a red thing"] * 5})
    tok = build_tokenizer(ds["caption"], 12)
    sample = make_transform(tok, model)({"image": ds["image"][:2], "caption": ds["caption"][:2]})
    px = sample["pixel_values"][0]
    assert px.shape == (channels, 32, 32) and px.dtype == torch.float32
    assert px.min() >= 0.0 and px.max() <= 1.0
    if channels == 3:
        assert px[0].mean() > 0.99 and px[1].mean() < 0.01  # red stays red, scaled to [0, 1]
    batch = next(iter(build_dataloader(ds, tok, model, batch_size=4, num_workers=0, shuffle=True, seed=0)))
    assert batch["pixel_values"].shape == (4, channels, 32, 32)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 12)
    assert batch["input_ids"].dtype == torch.long
