"""The one image decoder: any file Pillow opens -> the values a viewer shows, scaled to [0, 1].

Training (the ``datasets`` path), ``mmtrain predict``, ``mmtrain retrieve``, ``mmtrain export-data`` and
the pre-training image check all decode through :func:`viewed_image` / :func:`decode_image`, so the
model is fed bitwise the same tensor for the same file wherever the file comes in.

The rules, in the order they are applied:

1. **Open** a path, bytes, a ``datasets`` image dict ``{"bytes": ..., "path": ...}`` (bytes win, as in
   ``datasets``) or an already opened ``PIL.Image``. Multi-frame files (GIF, APNG, TIFF pages, MPO)
   give their **first frame**.
2. **Size limit.** Pillow's decompression-bomb guard, ``PIL.Image.MAX_IMAGE_PIXELS`` (89,478,485
   pixels by default; ``None`` turns it off), is applied strictly: a JPEG over it is decoded at 1/2,
   1/4 or 1/8 scale (libjpeg's DCT scaling, ``Image.draft``; the smallest reduction that fits), which
   costs a fraction of a full decode and loses nothing at training resolution; any other image over
   it is refused as a per-file :class:`ImageDecodeError`, never a crash or a warning that names no
   file. Pillow's warning between 1x and 2x the limit is therefore never shown: we decide instead.
3. **Decode fully** (a truncated file fails here, not later) and apply the **EXIF orientation**
   (``ImageOps.exif_transpose``), as every viewer does.
4. **Pixel values**, as a viewer shows them:

   - ``1``, ``L``, ``P``, ``RGB``, ``RGBX``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: Pillow's conversion to
     RGB (8 bit); gray (``channels=1``) is the ITU-R 601-2 luma of that RGB (Pillow's ``L``).
   - Transparency (``LA``, ``PA``, ``RGBA``, ``RGBa``, ``P`` with a transparent index, ``L``/``RGB`` with
     a PNG ``tRNS`` colour): **composited** (``Image.alpha_composite``) onto the background colour
     (``model.image_background``, white by default), as viewers show transparency on a page.
   - ``I;16``, ``I;16L``, ``I;16B``, ``I;16N`` (16-bit gray): value / 65535. A ``tRNS`` gray value is
     replaced by the background's luma on the same scale.
   - ``I`` (32-bit signed int): read on the 16-bit scale, clipped to [0, 65535], then / 65535.
     ``I`` images in practice are 16-bit scans and depth maps (Pillow opened 16-bit PNGs as ``I``
     for years, and 16-bit TIFFs with signed samples still open so), and a viewer shows them on that
     scale; a per-image min-max stretch would make the same value mean different things in different
     files, and the model could not compare them.
   - ``F`` (32-bit float): taken as intensity already in [0, 1] (the convention of float image data:
     scikit-image, torchvision, OpenEXR-style linear data), clipped to [0, 1]; NaN becomes 0. Same
     reason: no per-image stretch.

   High-bit-depth images are thus **scaled, never clamped to 8 bits**, and stay single-channel gray
   (repeated to 3 channels when the model is RGB): Pillow has no 16-bit or float colour modes.
5. **Tensor**: float32 (C, H, W) in [0, 1], C = ``channels``; 8-bit values are k / 255 exactly as
   torchvision's ``to_dtype(scale=True)`` computes them.

ICC colour profiles are not applied (Pillow does not by default, and neither did training before).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from pathlib import Path
from typing import Any, BinaryIO, TypeAlias

import numpy as np
import torch
from PIL import Image, ImageColor, ImageOps, JpegImagePlugin, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

# A path, the file's bytes, a datasets image dict {"bytes": ..., "path": ...}, or an opened image.
ImageSource: TypeAlias = "str | os.PathLike[str] | bytes | dict[str, Any] | Image.Image"

# Modes whose samples are wider than 8 bits: kept as one gray channel at full precision.
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Modes that carry an alpha channel; P/L/RGB may carry transparency in info["transparency"] instead.
WITH_ALPHA = ("LA", "La", "PA", "RGBA", "RGBa")


class ImageDecodeError(ValueError):
    """One image cannot be decoded. ``str(e)`` is a one-line reason without the file name: the
    caller names the file (or the dataset split and row) it was decoding."""


def image_extensions() -> frozenset[str]:
    """The file extensions (lower case, with the dot) that training's ``datasets`` imagefolder reads,
    so that predict/retrieve expand a folder to the images training would take from it."""
    try:
        from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

        return frozenset(e.lower() for e in ImageFolder.EXTENSIONS)
    except (ImportError, AttributeError):  # datasets builds its list from Pillow's
        return frozenset(e.lower() for e in Image.registered_extensions())


def background_rgb(background: str) -> tuple[int, int, int]:
    """``background`` (any ``PIL.ImageColor`` spec: ``white``, ``#f0f0f0``, ``rgb(9,9,9)``) as 8-bit
    (R, G, B); an alpha component is ignored. Raises ``ValueError`` naming the spec if Pillow cannot
    parse it."""
    return tuple(ImageColor.getrgb(background)[:3])  # type: ignore[return-value]


def _reason(e: BaseException) -> str:
    """A one-line reason: Pillow's ``strerror`` (the reason without the path) or the message."""
    if isinstance(e, UnidentifiedImageError):
        return "not an image file PIL can read"
    if isinstance(e, ImageDecodeError):
        return str(e)
    text = getattr(e, "strerror", None) or str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _stream(source: ImageSource) -> BinaryIO:
    """A binary stream over ``source``'s file: an open file for a path, else the bytes in memory.

    Never a file name for Pillow to open itself: Pillow then memory-maps uncompressed TIFFs, and in
    its mmap path (modes L, CMYK, I;16, ...) an EXIF orientation of 5-8 scrambles the pixels (Pillow
    13 reads the strip with the rotated size). From a stream it decodes them correctly."""
    if isinstance(source, dict):  # datasets' undecoded image value; its bytes win, as in datasets
        data, path = source.get("bytes"), source.get("path")
        if data is None and not path:
            raise ImageDecodeError("the dataset row holds neither image bytes nor a path")
        source = data if data is not None else path
    if isinstance(source, bytes | bytearray | memoryview):
        return io.BytesIO(source)
    if isinstance(source, str | os.PathLike):
        return Path(source).expanduser().open("rb")
    raise ImageDecodeError(f"cannot read an image from a {type(source).__name__}")


def _open(stream: BinaryIO) -> Image.Image:
    try:
        return Image.open(stream)
    except Image.DecompressionBombError:
        # Over 2x the limit Pillow refuses in open(), before a plugin could reduce the decode. A JPEG
        # can still be decoded at 1/8 scale: open it with the JPEG plugin itself (no size check there)
        # and let _fit_under_limit decide. Anything else: Pillow's refusal stands.
        stream.seek(0)
        with contextlib.suppress(Exception):
            return JpegImagePlugin.JpegImageFile(stream)
        raise


def _fit_under_limit(image: Image.Image) -> None:
    """Rule 2: draft an oversized JPEG down to the limit, refuse any other oversized image."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit is None or width * height <= limit:
        return
    if image.format in ("JPEG", "MPO"):
        for factor in (2, 4, 8):
            if math.ceil(width / factor) * math.ceil(height / factor) <= limit:
                # draft picks the largest DCT reduction that still gives at least the requested size.
                image.draft(image.mode, (math.ceil(width / factor), math.ceil(height / factor)))
                return
    raise ImageDecodeError(f"too large to decode safely: {width}x{height} = {width * height:,} pixels, over "
                           f"Pillow's limit PIL.Image.MAX_IMAGE_PIXELS = {limit:,} (a decompression-bomb guard); "
                           "downscale the file")


def _decoded(image: Image.Image) -> Image.Image:
    if image.tell() != 0:  # Image.open starts at frame 0; an image handed in may not
        image.seek(0)
    _fit_under_limit(image)
    image.load()
    # A new image (transposed, or a plain copy when there is no orientation): it holds no file, so
    # the stream can be closed, and an image handed in keeps its own pixels.
    return ImageOps.exif_transpose(image)


def open_image(source: ImageSource) -> Image.Image:
    """Rules 1-3: the first frame of ``source``, fully decoded, EXIF orientation applied, in its own
    Pillow mode (any of them). The returned image is a copy that holds no open file.

    ``source``: a path (``str`` / ``os.PathLike``), the file's bytes, a ``datasets`` image dict
    ``{"bytes": ..., "path": ...}`` or a ``PIL.Image.Image``. Raises :class:`ImageDecodeError` for
    anything that goes wrong (missing file, not an image, truncated, too large, broken EXIF, any
    exception a Pillow plugin raises)."""
    try:
        if isinstance(source, Image.Image):
            return _decoded(source)
        with _stream(source) as stream, warnings.catch_warnings():
            # Rule 2 decides about large images itself; Pillow's warning would name no file. Its other
            # warnings (corrupt EXIF, palette transparency) are about metadata this decoder already
            # handles, and would name no file either.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", module=r"PIL\.")
            return _decoded(_open(stream))
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:  # over 2x the limit, not a JPEG: Pillow refuses in open()
        raise ImageDecodeError(f"too large to decode safely ({_reason(e)}); downscale the file") from None
    except Exception as e:  # Pillow plugins raise OSError, SyntaxError, ValueError, KeyError, ...
        raise ImageDecodeError(_reason(e)) from None


def _sixteen_bit(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    values = np.asarray(image).astype(np.int64)  # I;16B/L/N become native; I is int32
    transparent = image.info.get("transparency")
    if isinstance(transparent, int) and image.mode != "I":
        gray = Image.new("RGB", (1, 1), background).convert("L").getpixel((0, 0))
        values = np.where(values == transparent, gray * 257, values)  # 257 = 65535 / 255
    return Image.fromarray(np.clip(values, 0, 65535).astype(np.uint16))  # uint16 -> I;16


def viewed_image(source: ImageSource, channels: int = 3, background: str = "white") -> Image.Image:
    """The image as a viewer shows it (rules 1-4), at full size, as a ``PIL.Image`` in one of four
    modes: ``L`` or ``RGB`` (8 bit, per ``channels``), or, for 16-bit and float sources, ``I;16``
    (values 0..65535) or ``F`` (values in [0, 1]) holding one gray channel.

    ``channels``: 1 (gray) or 3 (RGB). ``background``: the colour transparency is composited onto
    (a ``PIL.ImageColor`` spec). Saving the result losslessly (:func:`save_lossless`) and decoding
    that file again gives the same image. Raises :class:`ImageDecodeError`."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3 (got {channels!r})")
    bg = background_rgb(background)
    image = open_image(source)
    try:
        if image.mode in SIXTEEN_BIT:
            return _sixteen_bit(image, bg)
        if image.mode == "F":
            values = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
            return Image.fromarray(np.clip(values, 0.0, 1.0).astype(np.float32))  # float32 -> F
        palette_alpha = image.mode == "P" and image.palette is not None and image.palette.mode == "RGBA"
        if image.mode in WITH_ALPHA or palette_alpha or image.info.get("transparency") is not None:
            # convert("RGBA") applies a palette's transparent index / a tRNS colour and un-premultiplies RGBa.
            rgba = image.convert("RGBA")
            rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, (*bg, 255)), rgba).convert("RGB")
        elif channels == 1 and image.mode in ("1", "L"):
            return image.convert("L")
        else:
            rgb = image.convert("RGB")
        # Gray is the luma of what a viewer shows in colour, whatever the source mode.
        return rgb.convert("L") if channels == 1 else rgb
    except Exception as e:
        raise ImageDecodeError(f"cannot convert its {image.mode} pixels: {_reason(e)}") from None


def to_tensor(image: Image.Image, channels: int) -> torch.Tensor:
    """Rule 5: a :func:`viewed_image` result -> float32 tensor (``channels``, H, W) in [0, 1]."""
    if image.mode in ("L", "RGB"):
        tensor = TF.to_dtype(TF.to_image(image), torch.float32, scale=True).as_subclass(torch.Tensor)
    elif image.mode == "I;16":
        tensor = torch.from_numpy(np.asarray(image).astype(np.float32) / np.float32(65535))[None]
    elif image.mode == "F":
        tensor = torch.from_numpy(np.array(image, dtype=np.float32))[None]
    else:
        raise ValueError(f"not a viewed_image result: mode {image.mode}")
    if tensor.shape[0] != channels:  # gray high-bit-depth source for an RGB model
        tensor = tensor.expand(channels, -1, -1).contiguous()
    return tensor


def decode_image(source: ImageSource, channels: int = 3, background: str = "white") -> torch.Tensor:
    """``source`` -> float32 tensor (``channels``, H, W) in [0, 1] at the image's own size: the
    values a viewer shows (see the module docstring for every rule). Raises
    :class:`ImageDecodeError` with a one-line reason."""
    return to_tensor(viewed_image(source, channels, background), channels)


def save_lossless(image: Image.Image, stem: Path) -> Path:
    """Write a :func:`viewed_image` result as ``stem.png`` (L, RGB, I;16) or ``stem.tiff`` (F: PNG
    has no float samples), losslessly, so that decoding the file gives the same tensor. Returns the
    path written."""
    path = stem.with_suffix(".tiff" if image.mode == "F" else ".png")
    image.save(path)
    return path
