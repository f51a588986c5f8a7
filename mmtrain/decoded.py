"""The decode cache (``data.decode_cache``): every image decoded once, stored as pixels through ``datasets``.

Decoding a PNG, resizing and cropping it costs the same in every epoch; on the laptop preset it is about
a tenth of a CPU step. Here a split's images go once through :func:`mmtrain.data.pixel_transform`, the
exact function the on-the-fly path runs, in a ``Dataset.map``, and the float32 results are written to
Arrow next to the split's own cache files. The loader then reads rows of pixels instead of decoding, so
a batch holds bit-identical tensors either way, training numbers do not change and a resume is exact.

The map is cached under ``datasets``' fingerprint of the split and the map's arguments: the image size,
channels, background and :func:`decoder_version` (a hash of the decoder's source and of the library
versions that compute the pixels). ``datasets`` hashes a module-level function by its name, not its code,
so without that version a changed decoder would silently reuse old pixels; with it, any change to what
the pixels would be makes a new cache, and a second run with the same settings reuses the first's.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

from mmtrain.config import ModelConfig
from mmtrain.tokenizer import encode

# data.decode_cache auto caches when the decoded train + validation splits take at most this many bytes.
# The cache is memory-mapped, so what matters is that it stays in the page cache (a decoded float32 image
# is 10-50x its PNG; read from disk it can cost more than decoding) and that building it, one decode pass,
# stays short: 2 GiB is ~130k images at 64 px gray, ~10k at 128 px RGB.
DECODE_CACHE_AUTO_BYTES = 2 * 2**30
# Below this many images one process decodes them; above, the map is worth datasets' worker pool.
PARALLEL_DECODE_ROWS = 10_000


def decoded_bytes(rows: int, model: ModelConfig) -> int:
    """Bytes that ``rows`` decoded images take: float32 x image_channels x image_size^2 each."""
    return rows * model.image_channels * model.image_size**2 * 4


def wants_decode_cache(setting: str, rows: int, model: ModelConfig) -> bool:
    """Whether to decode once: ``setting`` is data.decode_cache (auto, true, false); ``rows`` counts the
    images of every split that would be cached (auto: on when they take at most DECODE_CACHE_AUTO_BYTES)."""
    if setting == "auto":
        return decoded_bytes(rows, model) <= DECODE_CACHE_AUTO_BYTES
    return setting == "true"


@functools.cache
def decoder_version() -> str:
    """A short hash of everything the cached pixels depend on besides the map's settings: the source of
    the decoder (``mmtrain.images``, the transform, the map function) and the versions of the libraries
    that compute them (Pillow, torch, torchvision, numpy)."""
    import PIL
    import torchvision

    from mmtrain import data, images

    try:
        sources = [inspect.getsource(images), inspect.getsource(data.pixel_transform),
                   inspect.getsource(_decode_pixels)]
    except OSError:  # installed without its .py files: the package version stands for the code
        from importlib.metadata import version

        sources = [version("mmtrain")]
    parts = [*sources, PIL.__version__, torch.__version__, torchvision.__version__, np.__version__]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _decode_pixels(images: list[Any], image_size: int, image_channels: int, image_background: str,
                   decoder: str, files: str) -> dict[str, np.ndarray]:
    """One ``datasets.map`` batch: undecoded images -> ``pixel_values`` (N, C*S*S) float32, each row the
    flattened tensor of :func:`mmtrain.data.pixel_transform`. Module-level so that datasets hashes it by
    name; ``decoder`` (:func:`decoder_version`) and ``files`` (:func:`files_digest`) only enter the
    fingerprint."""
    from mmtrain.data import pixel_transform

    to_tensor = pixel_transform(image_size, image_channels, image_background)
    flat = image_channels * image_size * image_size
    out = np.empty((len(images), flat), dtype=np.float32)
    for i, image in enumerate(images):
        out[i] = to_tensor(image).numpy().reshape(flat)
    return {"pixel_values": out}


def decode_once(ds: Any, model: ModelConfig, split: str) -> Any:
    """``ds`` (columns ``image``, ``caption``) as a ``datasets.Dataset`` of ``pixel_values`` (float32, flat
    C*S*S per row) and ``caption``, rows in the same order. Decoded by a cached ``map``: the first call
    for a split and these settings decodes every image, later ones (this run's other ranks, later runs)
    load the Arrow file. Raises ``mmtrain.images.ImageDecodeError`` as the on-the-fly path would."""
    import datasets

    from mmtrain.data import undecoded

    source = undecoded(ds)
    flat = model.image_channels * model.image_size**2
    features = datasets.Features({"pixel_values": datasets.List(datasets.Value("float32"), length=flat),
                                  "caption": datasets.Value("string")})
    return source.map(
        _decode_pixels, batched=True, batch_size=256, input_columns="image", remove_columns=["image"],
        features=features, desc=f"decoding {split} images once (data.decode_cache)",
        num_proc=min(os.cpu_count() or 1, 8) if len(ds) >= PARALLEL_DECODE_ROWS else None,
        fn_kwargs={"image_size": model.image_size, "image_channels": model.image_channels,
                   "image_background": model.image_background, "decoder": decoder_version(),
                   "files": files_digest(source)})


def files_digest(ds: Any) -> str:
    """A hash of the identity of every image file that ``ds`` (image column undecoded) refers to by path
    only: path, size, modification and change times in ns, inode. Rows holding their bytes (hub datasets,
    ``save_to_disk``) are covered by ``datasets``' own fingerprint; an image folder's fingerprint only
    tracks paths and mtimes, so a file replaced with its mtime kept (``cp -p``, ``rsync -a``, ``tar x``)
    would otherwise reuse stale pixels. The change time cannot be set back. A file that is gone hashes as
    such (the map then fails on it as the on-the-fly path would)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    digest = hashlib.sha256()
    for table in ds.select_columns(["image"]).with_format("arrow").iter(batch_size=8192):
        column = table.column("image")
        if pa.types.is_struct(column.type):
            paths = pc.struct_field(column, "path").to_pylist()
            path_only = pc.is_null(pc.struct_field(column, "bytes")).to_pylist()
        elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            paths = column.to_pylist()
            path_only = [True] * len(paths)
        else:
            return ""
        for path, by_path in zip(paths, path_only, strict=True):
            if by_path and path:
                try:
                    st = os.stat(path)
                    digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\n".encode())
                except OSError:
                    digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()[:16]


class DecodedSamples(TorchDataset):
    """A :func:`decode_once` split as the loader's samples: the same dicts as
    :func:`mmtrain.data.make_transform` gives (``pixel_values`` float32 (C, S, S), ``input_ids`` and
    ``attention_mask`` (L,)), read a batch at a time (``__getitems__``, which torch's DataLoader calls)
    through the numpy format: one Arrow take and one copy per batch. The torch format converts row by
    row and costs about as much as decoding (benchmarks/BENCHMARKS.md, Data pipeline). The captions are
    tokenized once here, in one batched call, as the pixels were decoded once: the same ids
    :func:`mmtrain.data.make_transform` gives per batch (padding to max_caption_length makes every
    caption's encoding independent of its batch)."""

    def __init__(self, decoded: Any, tokenizer: Any, model: ModelConfig) -> None:
        self.rows = decoded.with_format("numpy", columns=["pixel_values"])
        enc = encode(tokenizer, [str(c) for c in decoded["caption"]], model.max_caption_length)
        self.input_ids, self.attention_mask = enc["input_ids"], enc["attention_mask"]
        self.shape = (model.image_channels, model.image_size, model.image_size)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        batch = self.rows[indices]
        # A copy: the numpy view of an Arrow buffer is read-only, and torch wants to own writable memory.
        pixels = torch.from_numpy(np.array(batch["pixel_values"], dtype=np.float32)).view(len(indices), *self.shape)
        ids, mask = self.input_ids[indices], self.attention_mask[indices]
        return [{"pixel_values": pixels[i], "input_ids": ids[i], "attention_mask": mask[i]}
                for i in range(len(indices))]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]
