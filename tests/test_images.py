"""The one image decoder (mmtrain.images): every Pillow mode x every EXIF orientation to the values a
viewer shows, transparency, multi-frame files, oversized images, the geometric transform, and the same
tensor for the same file in training, predict, retrieve and export-data."""

import dataclasses
import io
import json
import warnings

import numpy as np
import pytest
import torch
from conftest import TINY
from PIL import Image

from mmtrain.cli import main
from mmtrain.config import ModelConfig, load_config
from mmtrain.data import build_dataloader, image_transform, load_splits
from mmtrain.errors import ConfigError, DataError
from mmtrain.images import ImageDecodeError, decode_image, open_image, viewed_image
from mmtrain.inference import embed_images, load_images, predict
from mmtrain.model import MultimodalModel
from mmtrain.tokenizer import build_tokenizer

NAN = float("nan")

# --- the matrix: modes x orientations -------------------------------------------------------------------
#
# Each case: the mode, the file format, the 2x3 image a viewer shows (in the mode's own units), how the
# file is saved, and the expected decoded values written out, RGB (channels=3) and gray (channels=1),
# in 8-bit units (/255) or, for high-bit-depth modes, already in [0, 1]. Background: white.

R, G, B, W, K = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)
CASES = {
    "1": ("PNG", [[0, 1, 1], [1, 0, 0]], {},
          [[K, W, W], [W, K, K]], [[0, 255, 255], [255, 0, 0]]),
    "L": ("PNG", [[0, 51, 102], [153, 204, 255]], {},
          [[(v,) * 3 for v in row] for row in [[0, 51, 102], [153, 204, 255]]], [[0, 51, 102], [153, 204, 255]]),
    # Gray + alpha: alpha 0 shows the background.
    "LA": ("PNG", [[(0, 255), (100, 0), (200, 255)], [(50, 255), (150, 0), (250, 255)]], {},
           [[K, W, (200,) * 3], [(50,) * 3, W, (250,) * 3]], [[0, 255, 200], [50, 255, 250]]),
    # Palette red, green, blue; gray is the ITU-R 601 luma: 76, 150, 29.
    "P": ("PNG", [[0, 1, 2], [2, 1, 0]], {},
          [[R, G, B], [B, G, R]], [[76, 150, 29], [29, 150, 76]]),
    # Index 1 (green) transparent: what `convert("RGB")` turned into green, a viewer shows as the page.
    "P+transparency": ("PNG", [[0, 1, 2], [2, 1, 0]], {"transparency": 1},
                       [[R, W, B], [B, W, R]], [[76, 255, 29], [29, 255, 76]]),
    "L+tRNS": ("PNG", [[0, 51, 102], [153, 204, 0]], {"transparency": 0},
               [[W, (51,) * 3, (102,) * 3], [(153,) * 3, (204,) * 3, W]], [[255, 51, 102], [153, 204, 255]]),
    "RGB": ("PNG", [[R, G, B], [W, K, (51, 102, 153)]], {},
            [[R, G, B], [W, K, (51, 102, 153)]], [[76, 150, 29], [255, 0, 93]]),
    "RGB+tRNS": ("PNG", [[R, G, B], [W, K, (51, 102, 153)]], {"transparency": (0, 0, 0)},
                 [[R, G, B], [W, W, (51, 102, 153)]], [[76, 150, 29], [255, 255, 93]]),
    "RGBA": ("PNG", [[(*R, 255), (*G, 0), (*B, 255)], [(*W, 255), (*K, 255), (51, 102, 153, 0)]], {},
             [[R, W, B], [W, K, W]], [[76, 255, 29], [255, 0, 255]]),
    # Cyan, magenta, yellow, white, black, white; gray 179, 105, 226.
    "CMYK": ("TIFF", [[(255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0)], [(0, 0, 0, 0), (0, 0, 0, 255), (0,) * 4]],
             {}, [[(0, 255, 255), (255, 0, 255), (255, 255, 0)], [W, K, W]], [[179, 105, 226], [255, 0, 255]]),
    # Neutral chroma (Cb = Cr = 128): the luma is the gray a viewer shows.
    "YCbCr": ("TIFF", [[(y, 128, 128) for y in row] for row in [[0, 51, 102], [153, 204, 255]]], {},
              [[(v,) * 3 for v in row] for row in [[0, 51, 102], [153, 204, 255]]], [[0, 51, 102], [153, 204, 255]]),
    # Pillow's CIELAB -> sRGB conversion at neutral a* = b* = 0 (signed bytes): L* 0, 255 and 128.
    "LAB": ("TIFF", [[(0, 0, 0), (255, 0, 0), (128, 0, 0)], [(255, 0, 0)] * 3], {},
            [[(1, 0, 1), (254, 255, 254), (119, 119, 119)], [(254, 255, 254)] * 3], [[0, 255, 119], [255] * 3]),
    # 16-bit: value / 65535 (257 = one 8-bit step), never clamped to 8 bits.
    "I;16": ("PNG", [[0, 257, 65535], [32768, 1, 65534]], {},
             [[0, 257 / 65535, 1], [32768 / 65535, 1 / 65535, 65534 / 65535]], None),
    "I;16B": ("TIFF", [[0, 257, 65535], [32768, 1, 65534]], {},
              [[0, 257 / 65535, 1], [32768 / 65535, 1 / 65535, 65534 / 65535]], None),
    # 32-bit int: the 16-bit scale, clipped.
    "I": ("TIFF", [[-5, 0, 65535], [70000, 32768, 1]], {},
          [[0, 0, 1], [1, 32768 / 65535, 1 / 65535]], None),
    # Float: intensity in [0, 1], clipped; NaN is 0.
    "F": ("TIFF", [[-0.5, 0.0, 0.25], [1.0, 1.5, NAN]], {},
          [[0, 0, 0.25], [1, 1, 0]], None),
}
RAW = {"I;16": ("I;16", "<u2"), "I;16B": ("I;16B", ">u2"), "I": ("I", "<i4"), "F": ("F", "<f4")}


def _make(mode_case: str, values: np.ndarray) -> Image.Image:
    mode = mode_case.split("+")[0]
    h, w = values.shape[:2]
    if mode == "1":
        return Image.fromarray(values.astype(bool))
    if mode in RAW:
        raw_mode, dtype = RAW[mode]
        return Image.frombytes(raw_mode, (w, h), values.astype(dtype).tobytes(), "raw", raw_mode)
    image = Image.frombytes(mode, (w, h), values.astype(np.uint8).tobytes())
    if mode == "P":
        image.putpalette([*R, *G, *B])
    return image


def _stored(viewed: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels to store so that a viewer applying EXIF ``orientation`` shows ``viewed`` (EXIF 2.3:
    6 = "rotate 90 degrees clockwise to display", 8 = counter-clockwise, 5/7 = the diagonal mirrors)."""
    return {1: lambda v: v, 2: np.fliplr, 3: lambda v: np.rot90(v, 2), 4: np.flipud,
            5: lambda v: v.swapaxes(0, 1), 6: lambda v: np.rot90(v, 1),
            7: lambda v: np.rot90(v, 2).swapaxes(0, 1), 8: lambda v: np.rot90(v, -1)}[orientation](viewed).copy()


def _write(path, image: Image.Image, fmt: str, orientation: int, **params) -> None:
    if fmt == "TIFF":
        image.save(path, "TIFF", tiffinfo={274: orientation}, **params)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(path, fmt, exif=exif.tobytes(), **params)


def _expected(values, high_bit: bool) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float64)
    t = t if high_bit else t / 255
    return (t.permute(2, 0, 1) if t.dim() == 3 else t[None]).float()


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("mode", list(CASES))
def test_every_mode_and_orientation_decodes_to_what_a_viewer_shows(tmp_path, mode, orientation):
    fmt, viewed, params, rgb, gray = CASES[mode]
    stored = _stored(np.array(viewed, dtype=np.float64), orientation)
    path = tmp_path / f"img.{fmt.lower()}"
    _write(path, _make(mode, stored), fmt, orientation, **params)
    with Image.open(path) as check:  # the file really is the mode under test
        assert check.mode == mode.split("+")[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even Pillow's palette-transparency warning
        got_rgb, got_gray = decode_image(path, 3), decode_image(path, 1)
    high_bit = gray is None
    want_rgb = _expected(rgb, high_bit)
    want_rgb = want_rgb.expand(3, -1, -1) if want_rgb.shape[0] == 1 else want_rgb
    want_gray = _expected(rgb if high_bit else gray, high_bit)
    assert got_rgb.shape == (3, 2, 3) and got_gray.shape == (1, 2, 3)
    assert got_rgb.dtype == got_gray.dtype == torch.float32
    torch.testing.assert_close(got_rgb, want_rgb, rtol=0, atol=1e-7)
    torch.testing.assert_close(got_gray, want_gray, rtol=0, atol=1e-7)


def test_partial_alpha_is_composited_onto_the_configured_background(tmp_path):
    pixels = np.array([[[0, 0, 0, 128], [0, 0, 0, 0], [0, 0, 0, 255]]], dtype=np.uint8)
    Image.frombytes("RGBA", (3, 1), pixels.tobytes()).save(tmp_path / "a.png")
    on_white = decode_image(tmp_path / "a.png", 3)
    torch.testing.assert_close(on_white[:, 0], torch.tensor([[127, 255, 0]] * 3) / 255, rtol=0, atol=1e-7)
    on_red = decode_image(tmp_path / "a.png", 3, "#ff0000")
    torch.testing.assert_close(on_red[:, 0], torch.tensor([[127, 255, 0], [0, 0, 0], [0, 0, 0]]) / 255,
                               rtol=0, atol=1e-7)
    on_gray = decode_image(tmp_path / "a.png", 1, "rgb(100,100,100)")
    torch.testing.assert_close(on_gray[0, 0], torch.tensor([50, 100, 0]) / 255, rtol=0, atol=1e-7)


def test_the_background_is_a_validated_model_field():
    assert ModelConfig().image_background == "white"
    assert ModelConfig(image_background="#204080").image_background == "#204080"
    with pytest.raises(ConfigError, match=r"model\.image_background must be a colour PIL understands"):
        ModelConfig(image_background="not-a-colour")


# --- sources, frames, sizes, errors ---------------------------------------------------------------------


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_a_path_bytes_a_datasets_dict_and_an_open_image_decode_alike(tmp_path):
    image = Image.frombytes("L", (3, 2), bytes([0, 10, 20, 30, 40, 50]))
    data = _png(image)
    (tmp_path / "a.png").write_bytes(data)
    want = decode_image(tmp_path / "a.png")
    for source in (str(tmp_path / "a.png"), data, {"bytes": data, "path": None},
                   {"bytes": None, "path": str(tmp_path / "a.png")}, Image.open(io.BytesIO(data))):
        assert torch.equal(decode_image(source), want)


def test_multi_frame_files_give_their_first_frame(tmp_path):
    first, second = Image.new("L", (4, 4), 30), Image.new("L", (4, 4), 200)
    first.save(tmp_path / "a.gif", save_all=True, append_images=[second])
    first.save(tmp_path / "a.tiff", save_all=True, append_images=[second])
    for name in ("a.gif", "a.tiff"):
        with Image.open(tmp_path / name) as check:
            assert check.n_frames == 2
        torch.testing.assert_close(decode_image(tmp_path / name, 1), torch.full((1, 4, 4), 30 / 255))
    moved = Image.open(tmp_path / "a.gif")
    moved.seek(1)  # an image handed in at another frame is still read from the first
    torch.testing.assert_close(decode_image(moved, 1), torch.full((1, 4, 4), 30 / 255))


def test_oversized_images_jpegs_are_reduced_others_are_a_named_failure(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp_path / "big.jpg")
    Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp_path / "big.png")
    # 4,096 pixels: over the limit (Pillow would warn) and over twice the limit (Pillow would raise).
    for limit in (3000, 1000):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            reduced = open_image(tmp_path / "big.jpg")  # 1/2 scale fits 3000, 1/4 scale fits 1000
            assert reduced.size == ((32, 32) if limit == 3000 else (16, 16))
            with pytest.raises(ImageDecodeError, match="too large to decode safely"):
                decode_image(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # not even 1/8 scale (64 pixels) fits
    with pytest.raises(ImageDecodeError, match=r"64x64 = 4,096 pixels, over Pillow's limit"):
        decode_image(tmp_path / "big.jpg")


@pytest.mark.parametrize(("data", "reason"), [
    (b"not an image at all", "not an image file PIL can read"),
    (_png(Image.effect_noise((64, 64), 80))[:400], "image file is truncated"),
], ids=["garbage", "truncated"])
def test_broken_files_raise_one_line_decode_errors(data, reason):
    with pytest.raises(ImageDecodeError, match=reason) as err:
        decode_image(data)
    assert "\n" not in str(err.value)


def test_missing_file_and_empty_dataset_value():
    with pytest.raises(ImageDecodeError, match="No such file"):
        decode_image("/nonexistent/x.png")
    with pytest.raises(ImageDecodeError, match="neither image bytes nor a path"):
        decode_image({"bytes": None, "path": None})


# --- geometry: resize the shorter side, centre crop -----------------------------------------------------


def _stripes(width: int, height: int, shades: list[int], vertical: bool = True) -> Image.Image:
    """Equal stripes of the given gray shades, left to right (or top to bottom)."""
    n = width if vertical else height
    line = np.repeat(np.array(shades, dtype=np.uint8), n // len(shades))
    grid = np.tile(line, (height, 1)) if vertical else np.tile(line[:, None], (1, width))
    return Image.frombytes("L", (width, height), grid.tobytes())


def test_non_square_images_are_centre_cropped_not_squashed(tmp_path):
    transform = image_transform(ModelConfig(image_size=16, image_channels=1, image_encoder_layers=2))
    # 32x16, shorter side already 16: the crop keeps the middle 16 columns, stripes 64 and 128 exactly.
    # Squashing to 16x16 would keep all four stripes (0, 64, 128, 255), 4 columns each.
    wide = transform(_stripes(32, 16, [0, 64, 128, 255]))
    assert torch.equal(wide, (torch.tensor([64] * 8 + [128] * 8) / 255).expand(1, 16, 16).float())
    tall = transform(_stripes(16, 32, [0, 64, 128, 255], vertical=False))
    assert torch.equal(tall, (torch.tensor([64] * 8 + [128] * 8)[:, None] / 255).expand(1, 16, 16).float())
    # 64x32: the shorter side 32 -> 16 halves everything (antialiased bilinear: each output column is
    # source columns 2j-1 .. 2j+2 weighted 1/4, 3/4, 3/4, 1/4, halved), then the middle 16 of 32 columns.
    # Column 0 = (1/4*0 + 7/4*64)/2 = 56, column 7 = (7/4*64 + 1/4*128)/2 = 72, column 8 =
    # (1/4*64 + 7/4*128)/2 = 120, column 15 = (7/4*128 + 1/4*255)/2 = 143.875.
    resized = transform(_stripes(64, 32, [0, 64, 128, 255]))
    row = torch.tensor([56] + [64] * 6 + [72, 120] + [128] * 6 + [143.875]) / 255
    torch.testing.assert_close(resized, row.expand(1, 16, 16).float(), rtol=0, atol=1e-6)


# --- the examples through the training path and predict -----------------------------------------


def _folder(tmp_path, files: dict):
    """An imagefolder of ``files`` {name: (image, save parameters)}, each captioned 'picture <name>'."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, (image, params) in files.items():
        image.save(folder / name, **params)
    (folder / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": n, "caption": f"picture {n}"}) + "\n" for n in files))
    return folder


def _training_tensors(folder, **overrides) -> dict[str, torch.Tensor]:
    """{file name: the tensor training feeds the model}, through load_splits and the DataLoader."""
    cfg = load_config(TINY, {"data.source": "imagefolder", "data.path": str(folder), **overrides})
    splits = load_splits(cfg.data, cfg.model)
    tok = build_tokenizer(["picture"], cfg.model.max_caption_length)
    found = {}
    for ds in splits:
        names = [c.split(" ", 1)[1] for c in ds["caption"]]
        loader = build_dataloader(ds, tok, cfg.model, batch_size=1, num_workers=0, shuffle=False, seed=0)
        for name, batch in zip(names, loader, strict=True):
            found[name] = batch["pixel_values"][0]
    return found


def test_exif_orientation_training_and_predict_see_the_block_at_the_top(tmp_path):
    """The issue's example: 40 JPEGs whose stored pixels have a black block in the left quarter, EXIF
    orientation 6, so that viewers show it at the top."""
    stored = np.full((64, 64), 230, dtype=np.uint8)
    stored[:, :16] = 0
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {f"o6_{i:02d}.jpg": (Image.frombytes("L", (64, 64), stored.tobytes()), {"exif": exif.tobytes()})
             for i in range(40)}
    folder = _folder(tmp_path, files)
    training = _training_tensors(folder)
    model = load_config(TINY).model
    paths = sorted(folder.glob("*.jpg"))
    ok, tensors, failures = load_images(paths, model)
    assert not failures and len(training) == len(ok) == 40
    for path, tensor in zip(ok, tensors, strict=True):
        assert torch.equal(tensor, training[path.name])  # predict/retrieve feed what training fed
        assert tensor.shape == (1, 32, 32)
        assert tensor[0, :7].mean() < 0.05 and tensor[0, 9:].mean() > 0.85  # block on top (rows 0-7 of 32)
        assert tensor[0, 9:, :8].mean() > 0.85  # and not at the left


def _ring() -> np.ndarray:
    yy, xx = np.mgrid[:64, :64]
    radius = np.hypot(yy - 31.5, xx - 31.5)
    return (radius > 20) & (radius < 26)


def test_transparent_line_art_is_black_on_white_in_training_and_predict(tmp_path):
    """The issue's example: 40 PNGs of an opaque black ring on a fully transparent background, half
    RGBA, half palette with a transparent index. Training saw solid black (mean 0.0)."""
    ring = _ring()
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[ring, 3] = 255
    palette = Image.frombytes("P", (64, 64), ring.astype(np.uint8).tobytes())
    palette.putpalette([0, 0, 0, 0, 0, 0])  # index 0, transparent, is black too: only transparency may decide
    files = {f"rgba_{i:02d}.png": (Image.frombytes("RGBA", (64, 64), rgba.tobytes()), {}) for i in range(20)}
    files |= {f"p_{i:02d}.png": (palette, {"transparency": 0}) for i in range(20)}
    folder = _folder(tmp_path, files)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        training = _training_tensors(folder)
        ok, tensors, failures = load_images(sorted(folder.glob("*.png")), load_config(TINY).model)
    assert not [w for w in caught if "ransparency" in str(w.message)], [str(w.message) for w in caught]
    assert not failures and len(training) == len(ok) == 40
    want = torch.from_numpy(~ring[::2, ::2]).float()  # ring pixels 0, the rest white, at 32x32
    for path, tensor in zip(ok, tensors, strict=True):
        assert torch.equal(tensor, training[path.name])
        assert tensor[0, 0, 0] == 1.0 and tensor[0, 16, 16] == 1.0  # outside and inside the ring: white
        assert 0.6 < tensor.mean() < 0.9  # measured 0.79 for the 64x64 ring
        assert (tensor[0] - want).abs().mean() < 0.1


def test_the_background_comes_from_the_model_config(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    files = {f"clear_{i:02d}.png": (Image.frombytes("RGBA", (8, 8), rgba.tobytes()), {}) for i in range(10)}
    folder = _folder(tmp_path, files)
    training = _training_tensors(folder, **{"model.image_channels": "3", "model.image_background": "#ff8000"})
    for tensor in training.values():
        torch.testing.assert_close(tensor, torch.tensor([1.0, 128 / 255, 0.0])[:, None, None].expand(3, 32, 32))


# --- one tensor per file, whatever the path -------------------------------------------------------------


def _random_values(mode: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    mode = mode.split("+")[0]
    if mode == "1":
        return rng.integers(0, 2, (h, w))
    if mode == "P":
        return rng.integers(0, 3, (h, w))
    if mode in ("I;16", "I;16B"):
        return rng.integers(0, 65536, (h, w))
    if mode == "I":
        return rng.integers(-1000, 70000, (h, w))
    if mode == "F":
        return rng.uniform(-0.2, 1.2, (h, w))
    bands = len(Image.new(mode, (1, 1)).getbands())
    return rng.integers(0, 256, (h, w, bands) if bands > 1 else (h, w))


@pytest.mark.parametrize(("channels", "background"), [("1", "white"), ("3", "#204080")])
def test_training_predict_retrieve_and_export_data_give_bitwise_the_same_tensor(tmp_path, channels, background):
    """One imagefolder holding every mode of the matrix, at two orientations, as 28x20 images (so that
    the transform resizes and crops), plus a JPEG and a multi-frame GIF."""
    rng = np.random.default_rng(0)
    files = {}
    for mode, (fmt, _, params, _, _) in CASES.items():
        for orientation in (1, 6):
            name = f"{mode.replace(';', '').replace('+', '_')}_{orientation}.{fmt.lower()}"
            image = _make(mode, _stored(_random_values(mode, rng, 20, 28), orientation))
            files[name] = (image, {**params, **({"tiffinfo": {274: orientation}} if fmt == "TIFF" else
                                                {"exif": _exif(orientation)})})
    files["photo.jpg"] = (Image.frombytes("RGB", (28, 20), rng.integers(0, 256, (20, 28, 3)).astype(np.uint8)
                                          .tobytes()), {"exif": _exif(8)})
    files["anim.gif"] = (Image.new("P", (28, 20), 1), {"save_all": True, "append_images": [Image.new("P", (28, 20))]})
    folder = _folder(tmp_path, files)
    overrides = {"model.image_channels": channels, "model.image_background": background}
    training = _training_tensors(folder, **overrides)
    assert len(training) == len(files)
    model_cfg = load_config(TINY, overrides).model

    # predict and retrieve: what the model's image encoder is fed, caught by a hook.
    tok = build_tokenizer(["picture"], model_cfg.max_caption_length)
    model = MultimodalModel(dataclasses.replace(model_cfg, vocab_size=len(tok))).eval()
    fed: list[torch.Tensor] = []
    model.image_encoder.register_forward_hook(lambda module, args, out: fed.append(args[0].clone()))
    paths = sorted(folder.glob("*.*"))
    paths = [p for p in paths if p.name != "metadata.jsonl"]
    records, failures = predict(model, tok, paths, None, batch_size=1, max_length=3, progress=False)
    assert not failures and [r["path"] for r in records] == [str(p) for p in paths]
    per_path = len(fed) // len(paths)  # reconstruction + caption generation each encode the image
    for i, path in enumerate(paths):
        for tensor in fed[i * per_path:(i + 1) * per_path]:
            assert torch.equal(tensor[0], training[path.name]), path.name
    fed.clear()
    kept, _, failures = embed_images(model, paths, batch_size=1, progress=False)
    assert not failures and kept == paths
    for path, tensor in zip(paths, fed, strict=True):
        assert torch.equal(tensor[0], training[path.name]), path.name

    # export-data (with the same overrides as training): decoding its files gives the same tensors.
    out = tmp_path / "exported"
    args = ["--data.source", "imagefolder", "--data.path", str(folder)]
    for key, value in overrides.items():
        args += [f"--{key}", value]
    for split in ("train", "validation"):
        assert main(["export-data", "--config", str(TINY), *args, "--split", split, "--out", str(out / split)]) == 0
    exported = {}
    for split in ("train", "validation"):
        for line in (out / split / "metadata.jsonl").read_text().splitlines():
            record = json.loads(line)
            exported[record["caption"].split(" ", 1)[1]] = out / split / record["file_name"]
    assert sorted(exported) == sorted(training)
    _, tensors, failures = load_images(list(exported.values()), model_cfg)
    assert not failures
    for name, tensor in zip(exported, tensors, strict=True):
        assert torch.equal(tensor, training[name]), name
    # and the exported file holds the viewed image itself, at full size (not the 32x32 model input)
    for name, path in exported.items():
        assert viewed_image(path, int(channels), background).size == viewed_image(folder / name).size


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def test_the_pre_training_check_uses_the_same_decoder(tmp_path, monkeypatch):
    """An image the decoder refuses (here: over the size limit) is named by the check before training,
    rather than passing the check and failing inside a DataLoader worker."""
    files = {f"ok_{i:02d}.png": (Image.new("L", (8, 8), i), {}) for i in range(10)}
    files["huge.png"] = (Image.new("L", (64, 64)), {})
    folder = _folder(tmp_path, files)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
    cfg = load_config(TINY, {"data.source": "imagefolder", "data.path": str(folder)})
    with pytest.raises(DataError, match=r"1 of 11 images cannot be read: .*huge\.png \(too large to decode"):
        load_splits(cfg.data, cfg.model)
