"""Image folders whose splits `datasets` infers from folder and file names (mmtrain.sources).

Every folder is real: small PNGs and metadata files written to tmp_path, loaded through
`mmtrain.data.load_splits`. Each image gets a caption naming its own path, so a test can check both
that every image was loaded and that each kept its caption.
"""

import csv
import json
import os
import re
import warnings
from pathlib import Path

import datasets
import pytest
from PIL import Image

from mmtrain.config import DataConfig, ModelConfig
from mmtrain.data import load_splits
from mmtrain.errors import DataError

MODEL = ModelConfig(image_size=32, image_channels=3, image_encoder_layers=2, max_caption_length=12)


def _caption(rel: str) -> str:
    return f"a picture of {rel}"


def _folder(root: Path, images: dict[str, int], metadata: dict[str, list[str]], fmt: str = "jsonl") -> Path:
    """``images``: {folder relative to root ('' = top level): how many PNGs}; ``metadata``: {folder of a
    metadata file: the image folders it lists}, with file_name relative to the metadata file's folder,
    as datasets requires."""
    for folder, n in images.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (10 * i % 256, 50, 90)).save(root / folder / f"img_{i:02d}.png")
    for meta_dir, listed in metadata.items():
        rows = [{"file_name": str(png.relative_to(root / meta_dir)), "caption": _caption(str(png.relative_to(root)))}
                for folder in listed for png in sorted((root / folder).glob("*.png"))]
        (root / meta_dir).mkdir(parents=True, exist_ok=True)
        if fmt == "jsonl":
            (root / meta_dir / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            with (root / meta_dir / "metadata.csv").open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=["file_name", "caption"])
                writer.writeheader()
                writer.writerows(rows)
    return root


def _all_captions(root: Path) -> list[str]:
    return sorted(_caption(str(p.relative_to(root))) for p in root.rglob("*.png"))


def _load(root: Path, **data):
    """load_splits on ``root``; returns (train, val, mmtrain's warnings about the folder)."""
    cfg = DataConfig(source="imagefolder", path=str(root), val_fraction=0.2, **data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train, val = load_splits(cfg, MODEL)
    ours = [str(w.message) for w in caught if str(w.message).startswith("data.path=")]
    return train, val, ours


def _assert_every_image_with_its_caption(root: Path, train, val) -> None:
    assert len(train) + len(val) == len(list(root.rglob("*.png")))
    assert sorted([*train["caption"], *val["caption"]]) == _all_captions(root)
    for split in (train, val):  # each caption names the file it was written for
        files = split.cast_column("image", datasets.Image(decode=False))["image"]
        for row, file in zip(split["caption"], files, strict=True):
            assert row == _caption(str(Path(file["path"]).relative_to(root.resolve())))


# --- the examples -----------------------------------------------------------------------------------


def test_split_word_folder_beside_a_plain_folder_loads_everything_as_one_split(tmp_path):
    # datasets took test_prints/ as a test split, dropped the 30 sketches and the top-level metadata
    root = _folder(tmp_path / "art", {"sketches": 30, "test_prints": 10}, {"": ["sketches", "test_prints"]})
    train, val, said = _load(root)
    _assert_every_image_with_its_caption(root, train, val)
    assert (len(train), len(val)) == (32, 8)  # val_fraction=0.2 of the one train split
    (message,) = said
    assert "test from test_prints/ (10 images) with no metadata file" in message
    assert "that leaves out sketches/ (30 images) and metadata.jsonl" in message
    assert "one train split" in message and "data.val_fraction=0.2" in message
    assert "train/ and validation/ (or test/) folders, each with its own metadata.jsonl" in message


def test_train_folder_beside_a_plain_folder_keeps_the_captions(tmp_path):
    # datasets made a train split of train/ alone, without the top-level metadata: no caption column
    root = _folder(tmp_path / "photos", {"train": 12, "new_batch_2024": 5}, {"": ["train", "new_batch_2024"]})
    train, val, said = _load(root)
    _assert_every_image_with_its_caption(root, train, val)
    (message,) = said
    assert "train from train/ (12 images) with no metadata file" in message
    assert "new_batch_2024/ (5 images)" in message


@pytest.mark.parametrize("options", [{"val_split": "test"}, {"val_split": "validation"},
                                     {"train_split": "sketches"}])
def test_explicit_split_that_inference_cannot_give_names_folders_and_layout(tmp_path, options):
    root = _folder(tmp_path / "art", {"sketches": 6, "test_prints": 2}, {"": ["sketches", "test_prints"]})
    with pytest.raises(DataError) as err:
        _load(root, **options)
    message = str(err.value)
    (option, value), = options.items()
    assert f"data.{option}={value!r}" in message
    assert "test from test_prints/ (2 images)" in message and "that leaves out sketches/ (6 images)" in message
    assert "train/ and validation/ (or test/) folders, each with its own metadata.jsonl" in message
    assert "leave data.train_split and data.val_split unset" in message


def test_only_rank_zero_warns(tmp_path, monkeypatch):
    root = _folder(tmp_path / "art", {"sketches": 4, "test_prints": 2}, {"": ["sketches", "test_prints"]})
    monkeypatch.setenv("RANK", "1")
    train, val, said = _load(root)
    assert said == [] and len(train) + len(val) == 6


# --- the standard layouts load exactly as datasets loads them -------------------------------------------------


def _as_datasets_loads_it(root: Path) -> dict[str, list[str]]:
    return {split: sorted(ds["caption"]) for split, ds in datasets.load_dataset("imagefolder",
                                                                                  data_dir=str(root)).items()}


def test_flat_folder_is_unchanged(tmp_path):
    root = _folder(tmp_path / "flat", {"": 10}, {"": [""]})
    train, val, said = _load(root)
    assert said == []
    _assert_every_image_with_its_caption(root, train, val)
    assert _as_datasets_loads_it(root) == {"train": _all_captions(root)}


@pytest.mark.parametrize("val_name", ["test", "validation"])
def test_split_folders_with_their_own_metadata_are_unchanged(tmp_path, val_name):
    root = _folder(tmp_path / "ds", {"train": 8, val_name: 3}, {"train": ["train"], val_name: [val_name]})
    train, val, said = _load(root)
    assert said == []
    _assert_every_image_with_its_caption(root, train, val)
    expected = _as_datasets_loads_it(root)
    assert (sorted(train["caption"]), sorted(val["caption"])) == (expected["train"], expected[val_name])


def test_nested_split_folders_are_unchanged(tmp_path):
    root = _folder(tmp_path / "ds", {"data/train": 6, "data/validation": 2},
                   {"data/train": ["data/train"], "data/validation": ["data/validation"]})
    train, val, said = _load(root)
    assert said == [] and (len(train), len(val)) == (6, 2)
    _assert_every_image_with_its_caption(root, train, val)


def test_nested_folders_without_split_words_are_unchanged(tmp_path):
    root = _folder(tmp_path / "years", {"2023/jan": 4, "2023/feb": 3, "2024/mar": 3},
                   {"": ["2023/jan", "2023/feb", "2024/mar"]})
    train, val, said = _load(root)
    assert said == []
    _assert_every_image_with_its_caption(root, train, val)


def test_valid_set_folder_is_a_validation_split(tmp_path):
    root = _folder(tmp_path / "ds", {"train": 6, "valid_set": 2}, {"train": ["train"], "valid_set": ["valid_set"]})
    train, val, said = _load(root)
    assert said == [] and sorted(val["caption"]) == sorted(_caption(f"valid_set/img_{i:02d}.png") for i in range(2))
    _assert_every_image_with_its_caption(root, train, val)


# --- one metadata file at the top, split folders below ----------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_top_level_metadata_with_split_folders_keeps_the_splits(tmp_path, fmt):
    # datasets reads a metadata file only for the split that contains it: both splits lost their captions
    root = _folder(tmp_path / "ds", {"train": 8, "test": 3}, {"": ["train", "test"]}, fmt=fmt)
    train, val, said = _load(root)
    _assert_every_image_with_its_caption(root, train, val)
    assert sorted(val["caption"]) == sorted(_caption(f"test/img_{i:02d}.png") for i in range(3))  # not held out
    (message,) = said
    assert f"metadata.{fmt} is in no split, so train and test would have no captions" in message
    assert "(train 8 samples, test 3 samples)" in message


def test_top_level_metadata_with_split_folders_and_explicit_val_split(tmp_path):
    root = _folder(tmp_path / "ds", {"train": 5, "test": 2}, {"": ["train", "test"]})
    train, val, _ = _load(root, val_split="test")
    assert (len(train), len(val)) == (5, 2)
    with pytest.raises(DataError, match=r"data\.val_split='validation' is not among the splits: datasets infers.*"
                                        r"train from train/ \(5 images\).*test from test/ \(2 images\)"):
        _load(root, val_split="validation")


def test_top_level_metadata_naming_a_missing_file_is_reported_by_the_image_check(tmp_path):
    root = _folder(tmp_path / "ds", {"train": 4, "test": 2}, {"": ["train", "test"]})
    with (root / "metadata.jsonl").open("a") as f:
        f.write(json.dumps({"file_name": "test/gone.png", "caption": "a picture that is not there"}) + "\n")
    with pytest.raises(DataError, match=r"1 of 7 images cannot be read: .*test/gone\.png"):
        _load(root)


def test_split_folder_without_any_metadata_for_it_says_where_to_add_it(tmp_path):
    root = _folder(tmp_path / "ds", {"train": 4, "test/batch1": 2}, {"train": ["train"]})
    with pytest.raises(DataError, match=r"split test has no captions\. Add test/batch1/metadata\.jsonl"):
        _load(root)


# --- other names datasets reads as splits ---------------------------------------------------------------------


def test_image_file_named_with_a_split_word_in_a_flat_folder(tmp_path):
    root = _folder(tmp_path / "flat", {"": 9}, {})
    Image.new("RGB", (8, 8)).save(root / "test_card.png")
    _folder(root, {}, {"": [""]})  # the metadata lists all ten
    train, val, said = _load(root)
    _assert_every_image_with_its_caption(root, train, val)
    (message,) = said
    assert "here: test from test_card.png with no metadata file" in message
    assert "rename test_card.png (test split) to a name without a split word, and change it to the new name in " \
           "the file_name entries of metadata.jsonl" in message


@pytest.mark.parametrize("split_folder", ["testing", "valid_set", "eval_2024", "dev"])
def test_split_word_folder_beside_plain_folders(tmp_path, split_folder):
    root = _folder(tmp_path / "ds", {"photos": 5, split_folder: 2}, {"": ["photos", split_folder]})
    train, val, said = _load(root)
    _assert_every_image_with_its_caption(root, train, val)
    assert f"from {split_folder}/ (2 images)" in said[0]


def test_train_folder_inside_a_plain_folder(tmp_path):
    root = _folder(tmp_path / "animals", {"cats/train": 4, "dogs": 3}, {"": ["cats/train", "dogs"]})
    train, val, said = _load(root)
    _assert_every_image_with_its_caption(root, train, val)
    assert "train from cats/train/ (4 images)" in said[0] and "leaves out dogs/ (3 images)" in said[0]


def test_split_folders_with_their_own_metadata_beside_a_plain_folder(tmp_path):
    root = _folder(tmp_path / "ds", {"train": 4, "test": 2, "extra": 3},
                   {"train": ["train"], "test": ["test"], "extra": ["extra"]})
    train, val, said = _load(root)
    _assert_every_image_with_its_caption(root, train, val)
    assert "leaves out extra/ (3 images)" in said[0]


def test_notes_file_that_datasets_takes_for_a_test_split(tmp_path):
    # datasets reads a folder holding instruction.md as a test split of that one file
    root = _folder(tmp_path / "ds", {"": 6}, {"": [""]})
    (root / "instruction.md").write_text("how these pictures were taken\n")
    train, val, said = _load(root)
    _assert_every_image_with_its_caption(root, train, val)
    assert "test from instruction.md (no image files)" in said[0]
    assert "rename instruction.md (test split) to a name without a split word." in said[0]  # no metadata lists it


def test_images_no_metadata_lists_are_named_in_the_warning(tmp_path):
    root = _folder(tmp_path / "art", {"sketches": 4, "test_prints": 2, "loose": 2}, {"": ["sketches", "test_prints"]})
    train, val, said = _load(root)
    assert len(train) + len(val) == 6
    assert "that leaves out loose/ (2 images), sketches/ (4 images) and metadata.jsonl" in said[0]
    assert "2 image files of 8 not listed in any metadata file" in said[1]
    assert "loose/img_00.png, loose/img_01.png. To use them, add a line for each to metadata.jsonl" in said[1]


# --- mmtrain's one-listing copy of the inference agrees with datasets' own ----------------------------------


@pytest.mark.parametrize("files", [
    ["a.png", "b.png", "metadata.jsonl"],
    ["sketches/a.png", "test_prints/b.png", "metadata.jsonl"],
    ["train/a.png", "train/metadata.jsonl", "test/b.png", "test/metadata.jsonl", "metadata.csv"],
    ["data/train/a.png", "data/validation/b.png", "data/valid_set/c.png", "x/test_1/d.png"],
    ["a.png", "test_card.png", "train-01.png", "trainset/e.png", "my train/f.png", "Training/g.png"],
    ["dev/a.png", "eval_2024/b.png", "evaluation/c.png", "testing/d.png", "cats/train/e.png", "dogs/f.png"],
    ["data/train-00000-of-00001.png", "data/test-00000-of-00001.png", "data/extra-00000-of-00002.png"],
    [".cache/test/a.png", "b.png", "README.md", "instruction.md", "notes.eval", "sub/task.toml"],
])
def test_inference_from_one_listing_matches_datasets(tmp_path, files):
    from datasets.data_files import DataFilesDict, get_data_patterns, resolve_pattern

    from mmtrain.imagefolder import _splits_from_listing

    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    base = tmp_path.resolve().as_posix()
    theirs = DataFilesDict.from_patterns(get_data_patterns(base), base_path=base)
    found = _splits_from_listing(base, resolve_pattern("**", base))
    assert found is not None
    patterns, ours = found
    assert patterns == {str(s): tuple(p) for s, p in get_data_patterns(base).items()}
    assert {split: sorted(f) for split, f in ours.items()} == {str(s): sorted(f) for s, f in theirs.items()}
    assert list(ours) == [str(s) for s in theirs]  # the same order: it decides which split validates


# --- following the printed fix makes the warning go away --------------------------------------------------


def _tree(root: Path, images: list[str], metadata: dict[str, list[str]]) -> Path:
    """``images``: PNG paths relative to root; ``metadata``: {folder of a metadata.jsonl: the images it
    lists}, each file_name relative to that folder."""
    for i, rel in enumerate(images):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (10 * i % 256, 50, 90)).save(root / rel)
    for meta_dir, listed in metadata.items():
        rows = [{"file_name": str(Path(rel).relative_to(meta_dir)), "caption": _caption(rel)} for rel in listed]
        (root / meta_dir / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _follow_rename_fix(root: Path, message: str) -> None:
    """Do what 'rename A (train split) and B, C (test split) to names without a split word, and change
    them to the new names in the file_name entries of M' says, with new names free of split words."""
    fix = re.search(r"rename (.*?) to (?:a name|names) without a split word(?:, and change .*? in the "
                    r"file_name entries of (.*?))?\.?$", message)
    assert fix, message
    old = [n for group in re.split(r" \(\w+ split\)(?: and )?", fix.group(1)) if group
           for n in re.split(r", | and ", group)]
    new = {n: f"renamed{i}{Path(n.rstrip('/')).suffix}" for i, n in enumerate(old)}

    def moved(rel: str) -> str:  # a path under the new names
        parts = rel.split("/")
        for name, to in new.items():
            depth = len(name.rstrip("/").split("/"))
            if rel.split("/")[:depth] == name.rstrip("/").split("/"):
                parts[depth - 1] = to
        return "/".join(parts)

    for meta in re.split(r", | and ", fix.group(2)) if fix.group(2) else []:
        rows = [json.loads(line) for line in (root / meta).read_text().splitlines()]
        meta_dir = os.path.dirname(meta) or "."
        for row in rows:
            row["file_name"] = os.path.relpath(moved(os.path.normpath(f"{meta_dir}/{row['file_name']}")),
                                               moved(meta_dir))
        (root / meta).write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in sorted(old, key=lambda n: -n.rstrip("/").count("/")):  # deepest first: its parents keep their path
        (root / name.rstrip("/")).rename((root / name.rstrip("/")).with_name(new[name]))


# The QA layouts whose one-split warning named the wrong thing (photos/) or a fix that stopped the run
# (a renamed val_01.png still listed under its old name): what the warning must name, and what it
# must say about the metadata.
RENAME_LAYOUTS = {
    "testing_file_in_plain_folder": (
        [f"photos/p{i}.png" for i in range(6)] + ["photos/testing.png"],
        {"photos": [f"photos/p{i}.png" for i in range(6)] + ["photos/testing.png"]},
        "rename photos/testing.png (test split) to a name without a split word, and change it to the new name in "
        "the file_name entries of photos/metadata.jsonl"),
    "flat_split_word_files": (
        [f"p{i}.png" for i in range(8)] + ["testimage.png", "val_01.png", "test_card.png"],
        {"": [f"p{i}.png" for i in range(8)] + ["testimage.png", "val_01.png", "test_card.png"]},
        "rename val_01.png (validation split) and test_card.png (test split) to names without a split word, and "
        "change them to the new names in the file_name entries of metadata.jsonl"),
    "flat_train_file": (
        [f"p{i}.png" for i in range(8)] + ["trainstation.png", "train_01.png"],
        {"": [f"p{i}.png" for i in range(8)] + ["trainstation.png", "train_01.png"]},
        "rename train_01.png (train split) to a name without a split word, and change it to the new name in the "
        "file_name entries of metadata.jsonl"),
    "split_folders_beside_plain_one_root_metadata": (
        [f"{d}/p{i}.png" for d in ("train", "test", "misc") for i in range(3)],
        {"": [f"{d}/p{i}.png" for d in ("train", "test", "misc") for i in range(3)]},
        "rename train/ (train split) and test/ (test split) to names without a split word, and change them to "
        "the new names in the file_name entries of metadata.jsonl"),
    "split_folder_with_its_own_metadata": (
        [f"sketches/p{i}.png" for i in range(4)] + [f"test_prints/q{i}.png" for i in range(2)],
        {"sketches": [f"sketches/p{i}.png" for i in range(4)], "test_prints": ["test_prints/q0.png",
                                                                               "test_prints/q1.png"]},
        "rename test_prints/ (test split) to a name without a split word."),
    "split_word_in_two_folder_names": (
        [f"training_data/train/p{i}.png" for i in range(3)] + [f"misc/q{i}.png" for i in range(3)],
        {"": [f"training_data/train/p{i}.png" for i in range(3)] + [f"misc/q{i}.png" for i in range(3)]},
        "rename training_data/ and training_data/train/ (train split) to names without a split word, and change "
        "them to the new names in the file_name entries of metadata.jsonl"),
    "nested_train_folder": (
        [f"cats/train/p{i}.png" for i in range(3)] + [f"dogs/q{i}.png" for i in range(3)],
        {"": [f"cats/train/p{i}.png" for i in range(3)] + [f"dogs/q{i}.png" for i in range(3)]},
        "rename cats/train/ (train split) to a name without a split word, and change it to the new name in the "
        "file_name entries of metadata.jsonl"),
}


@pytest.mark.parametrize("name", list(RENAME_LAYOUTS))
def test_one_split_warning_names_what_to_rename_and_following_it_silences_it(tmp_path, name):
    images, metadata, expected = RENAME_LAYOUTS[name]
    root = _tree(tmp_path / name, images, metadata)
    train, val, said = _load(root)
    _assert_every_image_with_its_caption(root, train, val)
    (message,) = said
    assert expected in message
    _follow_rename_fix(root, message)
    train, val, said = _load(root)
    assert said == []
    assert sorted([*train["caption"], *val["caption"]]) == sorted(_caption(rel) for rel in images)


def test_the_file_not_its_folder_is_named_as_the_split(tmp_path):
    images, metadata, _ = RENAME_LAYOUTS["testing_file_in_plain_folder"]
    (message,) = _load(_tree(tmp_path / "ds", images, metadata))[2]
    assert "here: test from photos/testing.png with no metadata file; that leaves out photos/ (6 images)" in message


# --- the split options offered never make validation the train split -----------------------------------------


def test_one_split_only_offers_holding_out_for_validation(tmp_path):
    root = _folder(tmp_path / "ds", {"test": 4}, {"test": ["test"]})
    with pytest.raises(DataError) as err:
        _load(root)
    assert "To load this folder, pass --data.train_split test and leave data.val_split unset to hold out " \
           "--data.val_fraction of it for validation;" in str(err.value)
    with pytest.raises(DataError) as err:
        _load(root, train_split="test", val_split="validation")
    assert "To load this folder, remove data.val_split to hold out --data.val_fraction" in str(err.value)
    assert "--data.val_split test" not in str(err.value)
    train, val, _ = _load(root, train_split="test")  # what it says works
    assert (len(train), len(val)) == (3, 1)


@pytest.mark.parametrize("options, offered", [
    ({"val_split": "validation"}, "pass --data.val_split test;"),
    ({"train_split": "sketches"}, "pass --data.train_split with one of train, test;"),
    ({"train_split": "sketches", "val_split": "test"}, "pass --data.train_split train;"),
    ({"train_split": "sketches", "val_split": "nope"},
     "pass --data.train_split with one of train, test and --data.val_split with another of them;"),
])
def test_validation_choices_leave_out_the_train_split(tmp_path, options, offered):
    root = _folder(tmp_path / "ds", {"train": 4, "test": 2}, {"train": ["train"], "test": ["test"]})
    with pytest.raises(DataError) as err:
        _load(root, **options)
    assert offered in str(err.value)
    assert "--data.val_split train" not in str(err.value)


# --- images no metadata line lists: reported on every load -----------------------------------------------------


def _add_lines_as_told(root: Path, message: str) -> None:
    """Add each unlisted image to the nearest metadata file above it, as the warning says."""
    listed = set()
    for meta in root.rglob("metadata.jsonl"):
        listed |= {str((meta.parent / json.loads(line)["file_name"]).relative_to(root))
                   for line in meta.read_text().splitlines()}
    for png in sorted(root.rglob("*.png")):
        rel = str(png.relative_to(root))
        if rel not in listed:
            meta = next(d / "metadata.jsonl" for d in png.parents if (d / "metadata.jsonl").exists())
            assert str(meta.relative_to(root)) in message
            with meta.open("a") as f:
                f.write(json.dumps({"file_name": str(png.relative_to(meta.parent)), "caption": _caption(rel)}) + "\n")


def _without(images: list[str], *left_out: str) -> list[str]:
    return [i for i in images if i not in left_out]


FLAT = [f"img_{i:02d}.png" for i in range(8)]
TRAIN, VAL = [f"train/img_{i:02d}.png" for i in range(8)], [f"validation/img_{i:02d}.png" for i in range(3)]


@pytest.mark.parametrize("images, metadata, unlisted, told", [
    (FLAT, {"": _without(FLAT, "img_06.png", "img_07.png")}, "img_06.png, img_07.png",
     'add a line for each to metadata.jsonl with its file_name (relative to that file\'s folder) and \'caption\', '
     'e.g. {"file_name": "img_06.png", "caption": "..."}'),
    (TRAIN + VAL, {"train": _without(TRAIN, "train/img_06.png", "train/img_07.png"), "validation": VAL},
     "train/img_06.png, train/img_07.png", 'add a line for each to train/metadata.jsonl with its file_name '
     '(relative to that file\'s folder) and \'caption\', e.g. {"file_name": "img_06.png", "caption": "..."}'),
    (TRAIN + VAL, {"": _without(TRAIN + VAL, "train/img_06.png", "train/img_07.png")},  # regrouped by mmtrain
     "train/img_06.png, train/img_07.png", 'e.g. {"file_name": "train/img_06.png", "caption": "..."}'),
])
def test_images_without_a_metadata_line_are_named_and_adding_the_line_loads_them(tmp_path, images, metadata,
                                                                                  unlisted, told):
    root = _tree(tmp_path / "ds", images, metadata)
    train, val, said = _load(root)
    assert len(train) + len(val) == len(images) - 2
    (message,) = [m for m in said if "not listed in any metadata file" in m]
    assert f"2 image files of {len(images)} not listed in any metadata file, so datasets drops them and " \
           f"mmtrain neither trains nor validates on them: {unlisted}." in message
    assert told in message
    _add_lines_as_told(root, message)
    train, val, said = _load(root)
    assert not [m for m in said if "not listed" in m]
    _assert_every_image_with_its_caption(root, train, val)


# --- a file under two split words is counted once ---------------------------------------------------------------


def _two_word_folder(root: Path, one_metadata: bool) -> Path:
    train = [f"train/p{i}.png" for i in range(5)] + [f"train/test_shots/t{i}.png" for i in range(3)]
    test = [f"test/q{i}.png" for i in range(4)]
    return _tree(root, train + test, {"": train + test} if one_metadata else {"train": train, "test": test})


@pytest.mark.parametrize("one_metadata", [True, False])
def test_file_under_two_split_words_goes_to_one_split_and_the_warning_says_which(tmp_path, one_metadata):
    root = _two_word_folder(tmp_path / "ds", one_metadata)
    train, val, said = _load(root, val_split="test")
    _assert_every_image_with_its_caption(root, train, val)
    assert (len(train), len(val)) == (8, 4)  # train/test_shots/ in train only, as with per-split metadata
    if one_metadata:
        (message,) = said
        assert "here: train from train/ (8 images) with no metadata file; test from test/ (4 images), " \
               "train/test_shots/ (3 images, counted in train) with no metadata file" in message
        assert "(train 8 samples, test 4 samples)" in message
    else:
        assert said == []


# --- the search for the name that carries a split word costs one search per folder --------------------------


def test_trigger_search_runs_once_per_folder(tmp_path):
    from mmtrain.imagefolder import inspect_imagefolder

    root = _tree(tmp_path / "ds", [f"train/p{i}.png" for i in range(50)] + [f"misc/q{i}.png" for i in range(3)],
                 {"": []})
    layout = inspect_imagefolder(str(root))
    assert layout is not None and layout.left_out_images
    names = {layout.trigger("train", f) for f in layout.images_of("train")}
    assert names == {"train/"} and len(layout._decided) == 1
