"""Inputs to predict / retrieve / export-data, without a trained model: names, folders, caption files,
options. Each case is one named line and exit 2, never a traceback; nothing written is overwritten."""

import io
import os
import struct
import warnings
from pathlib import Path

import pytest
from PIL import Image

from mmtrain.cli import main
from mmtrain.inference import _out_names, find_images, read_captions


def _png(path: Path, value: int = 0, size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).save(path)
    return path


def test_output_names_never_collide():
    """a.png, a.jpg and a-2.png used to write a-2.* twice (the second a took a-2, a name in use)."""
    paths = [Path("x/a-2.png"), Path("x/a.jpg"), Path("x/a.png"), Path("y/A.png"), Path("x/a.jpg")]
    names = _out_names(paths)
    assert len(set(n.lower() for n in names.values())) == len(set(paths)) == 4
    assert names[Path("x/a-2.png")] == "a-2"


def test_folders_expand_to_every_extension_training_reads(tmp_path):
    for name in ("a.png", "b.pgm", "c.tga", "d.jfif", "e.ppm", "sub/f.tif"):
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB" if name.endswith((".tga", ".ppm")) else "L", (4, 4)).save(
            target, format={"jfif": "JPEG", "pgm": "PPM", "ppm": "PPM"}.get(name.rsplit(".", 1)[1]))
    (tmp_path / "notes.txt").write_text("not an image")
    found, failures = find_images([tmp_path])
    assert [p.name for p in found] == ["a.png", "b.pgm", "c.tga", "d.jfif", "e.ppm", "f.tif"] and not failures


def test_a_folder_that_cannot_be_listed_is_named(tmp_path, monkeypatch):
    _png(tmp_path / "ok.png")
    _png(tmp_path / "locked" / "x.png")
    scandir = os.scandir

    def refusing(path="."):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    found, failures = find_images([tmp_path, tmp_path / "locked"])
    assert [p.name for p in found] == ["ok.png"]
    assert [(Path(f.path).name, f.reason) for f in failures] == [
        ("locked", "cannot list this folder (Permission denied)")] * 2


def test_pillow_metadata_warnings_name_no_file_and_are_not_shown(tmp_path):
    """A JPEG whose EXIF block is garbage decodes fine; Pillow's "Corrupt EXIF data" warning would
    reach the user as a line naming no file."""
    from mmtrain.images import open_image

    buf = io.BytesIO()
    Image.new("L", (8, 8), 77).save(buf, "JPEG")
    data = buf.getvalue()
    app1 = b"Exif\x00\x00" + b"MM\x00\x2a\x00\x00\x00\x08\xff\xff" + b"\x00" * 20
    path = tmp_path / "garbage_exif.jpg"
    path.write_bytes(data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert open_image(path).size == (8, 8)
    assert not caught, [str(w.message) for w in caught]


@pytest.mark.parametrize(("name", "content", "message"), [
    ("empty.jsonl", "\n\n", "holds no captions"),
    ("header.csv", "file_name,caption\n", "holds no captions"),
    ("years.csv", "caption\n1984\n2001\n", "holds no captions (" ),
    ("numbers.jsonl", '{"caption": 1}\n{"caption": 2}\n', "numbers.jsonl: line 1: 'caption' is 1, not text"),
])
def test_caption_files_without_captions_say_so(tmp_path, name, content, message):
    from mmtrain.errors import UserError

    (tmp_path / name).write_text(content)
    with pytest.raises(UserError) as info:
        read_captions(tmp_path / name)
    assert message in str(info.value) and "StopIteration" not in str(info.value)


def test_caption_files_tsv_utf16_and_form_feeds(tmp_path):
    from mmtrain.errors import UserError

    (tmp_path / "c.tsv").write_text("file_name\tcaption\na.png\ttwo circles, one square\n")
    assert read_captions(tmp_path / "c.tsv") == (["two circles, one square"], [])
    (tmp_path / "c.txt").write_text("a caption with a \x0c form feed\nsecond\u0085half\n")
    assert read_captions(tmp_path / "c.txt")[0] == ["a caption with a \x0c form feed", "second\u0085half"]
    (tmp_path / "u16.csv").write_bytes("caption\nhello\n".encode("utf-16-le"))
    with pytest.raises(UserError, match=r"not UTF-8 text .*save it as UTF-8"):
        read_captions(tmp_path / "u16.csv")


@pytest.mark.parametrize(("args", "message"), [
    (["predict", "MODEL", "x.png", "--device", "tpu"], "--device tpu: not a device mmtrain runs on"),
    (["predict", "MODEL", "x.png", "--device", "meta"], "--device meta: not a device mmtrain runs on"),
    (["predict", "MODEL", "x.png", "--max-length", "0"], "--max-length 0: must be >= 2"),
    (["predict", "MODEL", "x.png", "--out", "FILE/sub"], "cannot create or write this folder"),
    (["retrieve", "MODEL", "--images", "x.png", "--query", " "], "a query must hold some text"),
    (["export-data", "--config", "configs/tiny.yaml", "--out", "FILE/sub"], "cannot create or write this folder"),
    (["train", "--config", "configs/tiny.yaml", "--data.val_split", "train"], "data.val_split must differ"),
    (["train", "--config", "configs/tiny.yaml", "--data.caption_column", "image"], "data.caption_column must differ"),
])
def test_bad_options_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, args, message):
    from conftest import REPO

    monkeypatch.chdir(REPO)
    (tmp_path / "file").write_text("")
    args = [a.replace("FILE", str(tmp_path / "file")).replace("MODEL", str(tmp_path / "model")) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_config_values_starting_with_a_dash_are_values_on_the_command_line_too(tmp_path, capsys):
    """`seed: -1e3` in YAML reaches the seed rule; `--train.seed -1e3` used to be read as an option."""
    from mmtrain.cli import _attach_config_values

    assert _attach_config_values(["train", "--train.seed", "-1e3", "--wandb.tags", "-a", "--train.epochs"]) == [
        "train", "--train.seed=-1e3", "--wandb.tags=-a", "--train.epochs"]
    assert main(["train", "--config", "configs/tiny.yaml", "--train.seed", "-1e3"]) == 2
    assert "train.seed must be in [0, 4294967295] (got -1000)" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--train.batch", "--train.epoch", "--optim.max"])
def test_abbreviated_option_names_are_refused_as_in_yaml(capsys, option):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", "configs/tiny.yaml", option, "4"])
    assert exit_info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--train.seed", "--data.split_seed", "--data.synthetic_seed"])
@pytest.mark.parametrize("value", ["-5", "4294967296"])
def test_seeds_outside_32_bits_are_refused_before_start(capsys, option, value):
    assert main(["train", "--config", "configs/tiny.yaml", option, value]) == 2
    assert f"{option[2:]} must be in [0, 4294967295]" in capsys.readouterr().err
