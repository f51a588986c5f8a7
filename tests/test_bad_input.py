"""Bad input through the real CLI: exit code 2, one line naming the file or field (and the fix), no
traceback, and an earlier run in the output folder left exactly as it was, even with overwrite on."""

import hashlib
import io
import json
import shutil

import datasets
import pytest
from conftest import TINY, reset_accelerate
from PIL import Image

from mmtrain.cli import main

N_GOOD = 40


def _png_bytes(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (6 * i % 256, 100, 200)).save(buf, "PNG")
    return buf.getvalue()


def _truncated_png() -> bytes:
    """The first half of a valid PNG: it opens (the header is intact) and fails only when decoded.
    Noise, so that the pixel data is large enough for the cut to fall inside it."""
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 80).convert("RGB").save(buf, "PNG")
    data = buf.getvalue()
    return data[: len(data) // 2]


def _imagefolder(folder, bad=None, captions=None, metadata=True):
    """N_GOOD small PNGs plus ``bad`` {file name: bytes}, and metadata.jsonl with a caption each
    (``captions`` {file name: value} overrides some)."""
    folder.mkdir(parents=True)
    files = {f"img_{i:02d}.png": _png_bytes(i) for i in range(N_GOOD)} | (bad or {})
    for name, data in files.items():
        (folder / name).write_bytes(data)
    if metadata:
        captions = {name: f"a small picture number {i}" for i, name in enumerate(files)} | (captions or {})
        (folder / "metadata.jsonl").write_text(
            "".join(json.dumps({"file_name": n, "caption": c}) + "\n" for n, c in captions.items()))
    return folder


def _imagefolder_args(folder, *more):
    return ["--data.source", "imagefolder", "--data.path", str(folder), "--train.batch_size", "8", *more]


def _hashes(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    """One complete tiny run, copied by each test into the output folder its bad command points at."""
    out = tmp_path_factory.mktemp("earlier") / "run"
    code = main(["train", "--config", str(TINY), "--train.output_dir", str(out), "--wandb.mode", "disabled",
                 "--train.epochs", "1"])
    reset_accelerate()
    assert code == 0 and (out / "model").is_dir()
    return out


@pytest.fixture
def refused(earlier_run, tmp_path, capsys):
    """Run ``mmtrain train`` with bad input over a copy of the earlier run; return the error line
    after checking exit code 2, a single line, no traceback, and the earlier run intact."""
    def run(*args, config=TINY):
        out = tmp_path / "run"
        shutil.copytree(earlier_run, out)
        before = _hashes(out)
        capsys.readouterr()
        code = main(["train", "--config", str(config), "--train.output_dir", str(out), "--train.overwrite", "true",
                     "--wandb.mode", "disabled", *args])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "Traceback" not in err, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mmtrain: error: "), err
        after = _hashes(out)
        damaged = [name for name, digest in before.items() if after.get(name) != digest]
        assert not damaged, f"the earlier run lost or changed {damaged} (error was: {lines[0]})"
        return lines[0]

    return run


# --- unreadable images ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "reason"), [
    (b"this is not an image, whatever its name says\n" * 4, "not an image file"),
    (_truncated_png(), "image file is truncated"),
], ids=["garbage", "truncated"])
def test_unreadable_image_stops_the_run_naming_the_file(refused, tmp_path, data, reason):
    folder = _imagefolder(tmp_path / "imgs", bad={"broken.png": data})
    line = refused(*_imagefolder_args(folder))
    assert f"{folder / 'broken.png'} ({reason}" in line
    assert f"1 of {N_GOOD + 1} images cannot be read" in line
    assert "remove or replace" in line and "--data.skip_bad_samples true" in line


def test_unreadable_image_in_a_saved_dataset_names_split_and_row(refused, tmp_path):
    images = [{"bytes": _png_bytes(i), "path": None} for i in range(N_GOOD)]
    images[3] = {"bytes": _truncated_png(), "path": None}
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": images, "caption": [f"picture {i}" for i in range(N_GOOD)]},
                                    features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    line = refused("--data.source", "disk", "--data.path", str(tmp_path / "saved"), "--train.batch_size", "8")
    assert "split train row 3 (image file is truncated)" in line and str(tmp_path / "saved") in line
    assert "--data.skip_bad_samples true" in line


def test_skip_bad_samples_trains_and_reports_what_it_skipped(tmp_path, capsys):
    folder = _imagefolder(tmp_path / "imgs", bad={"a_garbage.png": b"GIF89a but not really",
                                                  "z_truncated.png": _truncated_png()})
    base = ["train", "--config", str(TINY), "--wandb.mode", "disabled", "--train.epochs", "1",
            *_imagefolder_args(folder)]

    assert main([*base, "--train.output_dir", str(tmp_path / "refused")]) == 2
    reset_accelerate()
    err = capsys.readouterr().err
    assert f"2 of {N_GOOD + 2} images cannot be read: {folder / 'a_garbage.png'} (" in err
    assert str(folder / "z_truncated.png") in err

    out = tmp_path / "run"
    assert main([*base, "--train.output_dir", str(out), "--data.skip_bad_samples", "true"]) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith("mmtrain: warning: data.skip_bad_samples")]
    assert len(warning) == 1, err
    assert f"skipped 2 of {N_GOOD + 2} samples" in warning[0]
    assert str(folder / "a_garbage.png") in warning[0] and str(folder / "z_truncated.png") in warning[0]
    assert (out / "model").is_dir() and (out / "summary.json").is_file()


# --- folders without images -----------------------------------------------------------------------------


def test_imagefolder_with_only_metadata(refused, tmp_path):
    folder = tmp_path / "meta_only"
    folder.mkdir()
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "caption": "a cat"}) + "\n")
    line = refused(*_imagefolder_args(folder))
    assert f"data.path={str(folder)!r}: no image files in this folder (it holds only metadata.jsonl)" in line
    assert "must hold the images" in line and "metadata.jsonl or metadata.csv" in line


def test_empty_imagefolder(refused, tmp_path):
    (tmp_path / "nothing").mkdir()
    line = refused(*_imagefolder_args(tmp_path / "nothing"))
    assert f"data.path={str(tmp_path / 'nothing')!r}: no image files in this folder (it is empty)" in line
    assert "must hold the images" in line


# --- the checks that were already there -----------------------------------------------------------------


def test_imagefolder_without_data_path(refused):
    line = refused("--data.source", "imagefolder")
    assert "data.path is required when data.source is 'imagefolder'; pass --data.path FOLDER" in line


def test_metadata_without_the_caption_column(refused, tmp_path):
    folder = _imagefolder(tmp_path / "imgs")
    line = refused(*_imagefolder_args(folder, "--data.caption_column", "text"))
    assert "column 'text' (data.caption_column) not found" in line and "columns are image, caption" in line
    assert "Set --data.caption_column" in line


def test_caption_that_is_a_number_names_the_metadata_line(refused, tmp_path):
    folder = _imagefolder(tmp_path / "imgs", captions={"img_01.png": 7})
    line = refused(*_imagefolder_args(folder))
    assert f"{folder / 'metadata.jsonl'}: line 2: 'caption' is 7, not a string" in line
    assert 'write "7" in quotes' in line


@pytest.mark.parametrize(("caption", "what"), [("  ", "empty"), (None, "not a string: None")],
                         ids=["empty", "null"])
def test_empty_or_missing_caption_names_the_image(refused, tmp_path, caption, what):
    folder = _imagefolder(tmp_path / "imgs", captions={"img_05.png": caption})
    line = refused(*_imagefolder_args(folder))
    assert f"{folder / 'img_05.png'}: its caption ('caption' in the metadata) is {what}" in line


def test_all_numeric_captions_name_the_image(refused, tmp_path):
    folder = _imagefolder(tmp_path / "imgs", captions={f"img_{i:02d}.png": i for i in range(N_GOOD)})
    line = refused(*_imagefolder_args(folder))
    assert f"{folder / 'img_00.png'}: its caption ('caption' in the metadata) is not a string: 0" in line


def test_dataset_smaller_than_one_global_batch(refused):
    line = refused("--data.synthetic_train_size", "8", "--train.batch_size", "16")
    assert "the training split has 8 samples, fewer than one global batch" in line
    assert "train.batch_size=16" in line and "lower train.batch_size" in line


def test_image_size_the_encoder_cannot_halve_cleanly(refused):
    line = refused("--model.image_size", "30")
    assert "model.image_size must be divisible by 2**image_encoder_layers = 4" in line and "(got 30)" in line


def test_yaml_that_does_not_parse_names_file_and_line(refused, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("  epochs: 2\n", "  epochs: [2\n"))
    line = refused(config=bad)
    assert f"{bad}:" in line and "line " in line and "not valid YAML" in line


# --- export-data ----------------------------------------------------------------------------------------


def test_export_data_takes_the_same_overrides_as_train(tmp_path, capsys):
    """A user who trained with --section.field overrides exports the same data with the same options
    (they used to be refused as unrecognized arguments)."""
    out = tmp_path / "exported"
    assert main(["export-data", "--config", str(TINY), "--data.synthetic_val_size", "6", "--model.image_channels",
                 "3", "--model.image_size", "16", "--split", "validation", "--out", str(out)]) == 0
    assert "wrote 6 images" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in records] == [f"validation_{i:05d}.png" for i in range(6)]
    for record in records:
        with Image.open(out / record["file_name"]) as image:  # drawn at 16x16, written as the RGB model sees it
            assert image.size == (16, 16) and image.mode == "RGB"
    assert main(["export-data", "--config", str(TINY), "--model.image_channels", "5", "--out",
                 str(tmp_path / "x")]) == 2
    assert "model.image_channels must be 1 or 3" in capsys.readouterr().err


def test_export_data_names_an_unreadable_image_and_exports_the_rest(tmp_path, capsys):
    folder = _imagefolder(tmp_path / "imgs", bad={"broken.png": _truncated_png()})
    exported = 0
    for split in ("train", "validation"):
        out = tmp_path / split
        code = main(["export-data", "--config", str(TINY), "--data.source", "imagefolder", "--data.path", str(folder),
                     "--split", split, "--out", str(out)])
        captured = capsys.readouterr()
        assert code == 2 and "Traceback" not in captured.err
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].endswith("; skipped"), captured.err
        assert lines[0].startswith(f"mmtrain: error: {folder / 'broken.png'}: cannot be read as an image: "
                                   "image file is truncated"), lines[0]
        exported += len((out / "metadata.jsonl").read_text().splitlines())
    assert exported == N_GOOD  # every readable image, across the two splits training would use


def test_export_data_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    assert main(["export-data", "--config", str(TINY), "--out", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmtrain: error: --out") and "is a file" in err and len(err.splitlines()) == 1
