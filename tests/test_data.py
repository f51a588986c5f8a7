"""Data sources through `datasets` (imagefolder, save_to_disk, hub), splits, transforms and loaders."""

import contextlib
import json
import signal
import time

import datasets
import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from PIL import Image

from mmtrain.config import DataConfig, ModelConfig
from mmtrain.data import VAL_SPLIT_NAMES, build_dataloader, load_splits, make_transform
from mmtrain.errors import DataError, UserError
from mmtrain.tokenizer import build_tokenizer

MODEL = ModelConfig(image_size=32, image_channels=3, image_encoder_layers=2, max_caption_length=12)


def _shade(i):
    return 10 + 20 * i  # each sample's grey level encodes its index, so pairing can be checked after loading


def _index_of(image):
    return (int(np.asarray(image.convert("L")).mean().round()) - 10) // 20


def _write_images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"img_{i:02d}.png"
        Image.new("RGB", (40, 36 + i), (_shade(i),) * 3).save(folder / name)
        names.append(name)
    return names


def _disk_dataset(path, splits, image_column="image", caption_column="caption"):
    """save_to_disk a DatasetDict {split: captions}, or a single Dataset when ``splits`` is a list."""
    def one(captions):
        return Dataset.from_dict({
            image_column: [Image.new("L", (20, 20), _shade(i)) for i in range(len(captions))],
            caption_column: captions,
        }).cast_column(image_column, datasets.Image())

    ds = one(splits) if isinstance(splits, list) else DatasetDict({k: one(v) for k, v in splits.items()})
    ds.save_to_disk(str(path))
    return str(path)


def _check_pairs(*splits):
    for split in splits:
        for row in split:
            assert row["caption"].endswith(f" {_index_of(row['image'])}"), row["caption"]


# --- imagefolder ------------------------------------------------------------------------------------------


def test_imagefolder_with_metadata_jsonl_and_custom_caption_column(tmp_path):
    folder = tmp_path / "imgs"
    names = _write_images(folder, 10)
    with (folder / "metadata.jsonl").open("w") as f:
        for i, name in enumerate(names):
            f.write(json.dumps({"file_name": name, "text": f"picture number {i}", "extra": i}) + "\n")
    cfg = DataConfig(source="imagefolder", path=str(folder), caption_column="text", val_fraction=0.2)
    train, val = load_splits(cfg, MODEL)
    assert (len(train), len(val)) == (8, 2)
    assert train.column_names == val.column_names == ["image", "caption"]
    assert sorted([*train["caption"], *val["caption"]]) == sorted(f"picture number {i}" for i in range(10))
    assert isinstance(train[0]["image"], Image.Image)
    _check_pairs(train, val)  # each caption stays with its own image


def test_imagefolder_with_metadata_csv(tmp_path):
    folder = tmp_path / "imgs"
    names = _write_images(folder, 6)
    (folder / "metadata.csv").write_text(
        "file_name,description\n" + "".join(f"{n},a grey square {i}\n" for i, n in enumerate(names)))
    cfg = DataConfig(source="imagefolder", path=str(folder), caption_column="description", val_fraction=0.5)
    train, val = load_splits(cfg, MODEL)
    assert (len(train), len(val)) == (3, 3)
    assert sorted([*train["caption"], *val["caption"]]) == sorted(f"a grey square {i}" for i in range(6))
    _check_pairs(train, val)


def test_imagefolder_without_captions_names_the_column(tmp_path):
    _write_images(tmp_path / "imgs", 3)
    with pytest.raises(DataError) as err:
        load_splits(DataConfig(source="imagefolder", path=str(tmp_path / "imgs")), MODEL)
    assert "'caption'" in str(err.value) and "data.caption_column" in str(err.value)


def test_folder_that_is_not_a_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    for source, hint in (("imagefolder", "metadata.jsonl"), ("disk", "save_to_disk")):
        with pytest.raises(DataError) as err:
            load_splits(DataConfig(source=source, path=str(tmp_path / "empty")), MODEL)
        assert str(tmp_path / "empty") in str(err.value) and hint in str(err.value)


# --- save_to_disk -----------------------------------------------------------------------------------------


def test_save_to_disk_with_validation_split_is_used_as_val(tmp_path):
    path = _disk_dataset(tmp_path / "ds", {"train": [f"train {i}" for i in range(5)],
                                           "validation": [f"val {i}" for i in range(3)]},
                         image_column="picture", caption_column="desc")
    cfg = DataConfig(source="disk", path=path, image_column="picture", caption_column="desc", val_fraction=0.5)
    train, val = load_splits(cfg, MODEL)
    assert list(train["caption"]) == [f"train {i}" for i in range(5)]  # nothing held out of train
    assert list(val["caption"]) == [f"val {i}" for i in range(3)]
    assert train.column_names == ["image", "caption"]
    _check_pairs(train, val)


@pytest.mark.parametrize("name", [n for n in VAL_SPLIT_NAMES if n != "validation"])
def test_other_validation_split_names(tmp_path, name):
    path = _disk_dataset(tmp_path / "ds", {"train": ["a 0", "b 1"], name: ["c 0"]})
    train, val = load_splits(DataConfig(source="disk", path=path), MODEL)
    assert (list(train["caption"]), list(val["caption"])) == (["a 0", "b 1"], ["c 0"])


def test_explicit_val_split(tmp_path):
    path = _disk_dataset(tmp_path / "ds", {"train": ["a 0", "b 1"], "validation": ["c 0"], "extra": ["d 0"]})
    _, val = load_splits(DataConfig(source="disk", path=path, val_split="extra"), MODEL)
    assert list(val["caption"]) == ["d 0"]
    with pytest.raises(DataError, match=r"data\.val_split='holdout'.*splits: train, validation, extra"):
        load_splits(DataConfig(source="disk", path=path, val_split="holdout"), MODEL)


def test_single_split_is_held_out_by_val_fraction_with_split_seed(tmp_path):
    captions = [f"sample {i}" for i in range(20)]
    path = _disk_dataset(tmp_path / "single", captions)

    def split(seed, fraction=0.25):
        train, val = load_splits(DataConfig(source="disk", path=path, val_fraction=fraction, split_seed=seed), MODEL)
        return list(train["caption"]), list(val["caption"])

    train, val = split(0)
    assert (len(train), len(val)) == (15, 5)
    assert sorted(train + val) == sorted(captions) and not set(train) & set(val)
    assert split(0) == (train, val)  # deterministic
    assert split(1)[1] != val  # another seed holds out other samples
    assert len(split(0, 0.5)[1]) == 10


def test_single_sample_cannot_be_split(tmp_path):
    path = _disk_dataset(tmp_path / "one", ["only 0"])
    with pytest.raises(DataError, match="1 sample"):
        load_splits(DataConfig(source="disk", path=path), MODEL)


def test_missing_caption_column_names_it_and_lists_the_columns(tmp_path):
    path = _disk_dataset(tmp_path / "ds", {"train": ["a 0", "b 1"], "validation": ["c 0"]},
                         caption_column="text")
    with pytest.raises(DataError) as err:
        load_splits(DataConfig(source="disk", path=path), MODEL)
    msg = str(err.value)
    assert "'caption'" in msg and "data.caption_column" in msg
    assert "columns are image, text" in msg
    with pytest.raises(DataError, match=r"'photo' \(data\.image_column\).*columns are image, text"):
        load_splits(DataConfig(source="disk", path=path, image_column="photo", caption_column="text"), MODEL)


@pytest.mark.parametrize(("captions", "needle"), [
    (["ok 0", "", "fine 2"], r"row 1 .* is empty"),
    (["ok 0", "fine 1", "   "], r"row 2 .* is empty"),
])
def test_empty_caption_is_refused(tmp_path, captions, needle):
    path = _disk_dataset(tmp_path / "ds", {"train": captions, "validation": ["v 0"]})
    with pytest.raises(DataError, match=needle) as err:
        load_splits(DataConfig(source="disk", path=path), MODEL)
    assert "split train" in str(err.value)


def test_missing_caption_value_is_refused(tmp_path):
    path = _disk_dataset(tmp_path / "ds", {"train": ["ok 0", "ok 1"], "validation": ["v 0", None]})
    with pytest.raises(DataError, match=r"split validation.*row 1 .*not a string: None"):
        load_splits(DataConfig(source="disk", path=path), MODEL)


# --- hub, offline -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _time_limit(seconds):
    def stop(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_hub_offline_fails_fast_with_a_clear_message():
    start = time.monotonic()
    with _time_limit(60), pytest.raises(DataError) as err:
        load_splits(DataConfig(source="hub", path="someone/engravings"), MODEL)
    assert time.monotonic() - start < 30
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 500  # one line, not a traceback wall
    assert "someone/engravings" in msg and "hub" in msg
    assert "save_to_disk" in msg and "data.source=disk" in msg  # what to do instead
    assert isinstance(err.value, UserError)
    assert err.value.__cause__ is None and err.value.__suppress_context__


# --- transform and loader ---------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_transform_pixels_and_tokens(channels):
    model = ModelConfig(image_size=32, image_channels=channels, image_encoder_layers=2, max_caption_length=12)
    images = [Image.new("RGB", (50, 40), (255, 0, 0)), Image.new("L", (20, 64), 255), Image.new("RGBA", (32, 32))]
    captions = ["a red thing", "a white tall thing", "a clear square thing that is long and has many words"]
    tok = build_tokenizer(captions, 12)
    out = make_transform(tok, model)({"image": images, "caption": captions})
    for px in out["pixel_values"]:
        assert px.shape == (channels, 32, 32) and px.dtype == torch.float32
        assert px.min() >= 0.0 and px.max() <= 1.0
    red, white, clear = out["pixel_values"]
    if channels == 3:
        assert torch.allclose(red[0], torch.ones(32, 32)) and torch.allclose(red[1:], torch.zeros(2, 32, 32))
    else:
        assert torch.allclose(red, torch.full((1, 32, 32), 76 / 255), atol=1 / 255)  # ITU-R 601 luma of red
    assert torch.allclose(white, torch.ones(channels, 32, 32))  # scaled to [0, 1], not [0, 255]
    assert torch.allclose(clear, torch.ones(channels, 32, 32))  # transparent: the white background, as viewers show it
    for ids, mask in zip(out["input_ids"], out["attention_mask"], strict=True):
        assert ids.shape == mask.shape == (12,)
        assert ids[0].item() == tok.bos_token_id
        assert tok.eos_token_id in ids.tolist()
    assert out["attention_mask"][0].tolist() == [1] * 5 + [0] * 7  # [BOS] a red thing [EOS]
    assert out["input_ids"][2][-1].item() == tok.eos_token_id  # truncated to max_caption_length


@pytest.mark.parametrize("channels", [1, 3])
def test_dataloader_batches(channels):
    model = ModelConfig(image_size=32, image_channels=channels, image_encoder_layers=2, max_caption_length=12)
    n = 10
    ds = Dataset.from_dict({"image": [Image.new("RGB", (48, 40), (_shade(i),) * 3) for i in range(n)],
                            "caption": [f"thing number {i}" for i in range(n)]})
    tok = build_tokenizer(ds["caption"], 12)

    def order(seed, shuffle=True):
        seen, shapes = [], []
        for batch in build_dataloader(ds, tok, model, batch_size=4, num_workers=0, shuffle=shuffle, seed=seed):
            assert batch["pixel_values"].dtype == torch.float32
            assert batch["input_ids"].dtype == torch.long
            assert batch["input_ids"].shape == batch["attention_mask"].shape == (len(batch["input_ids"]), 12)
            shapes.append(tuple(batch["pixel_values"].shape))
            for px, ids in zip(batch["pixel_values"], batch["input_ids"], strict=True):
                i = (round(px.mean().item() * 255) - 10) // 20
                assert tok.decode(ids, skip_special_tokens=True) == f"thing number {i}"  # pairs stay together
                seen.append(i)
        return seen, shapes

    seen, shapes = order(0)
    assert shapes == [(4, channels, 32, 32), (4, channels, 32, 32), (2, channels, 32, 32)]  # no drop_last
    assert sorted(seen) == list(range(n))
    assert order(0)[0] == seen and order(1)[0] != seen  # the shuffle is seeded
    assert order(0, shuffle=False)[0] == list(range(n))
