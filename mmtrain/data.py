"""Image-caption data through Hugging Face ``datasets``: sources, splits, lazy transforms, loaders.

Every source ends as two ``datasets.Dataset`` objects with the columns ``image`` and ``caption``.
Decoding, resizing and tokenizing happen lazily in ``with_transform``, inside DataLoader workers,
so nothing is materialised twice and start-up stays fast.

User data is checked once, before training: every image of the user's sources is fully decoded
(a bad file would otherwise stop the run mid-epoch inside a DataLoader worker, hours in). The
check is a ``datasets.map`` and so is cached by fingerprint: a second run on the same data is free.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, default_collate
from torchvision.transforms import v2

from mmtrain.config import Config, DataConfig, ModelConfig
from mmtrain.decoded import DecodedSamples, decode_once
from mmtrain.errors import CheckpointError, DataError
from mmtrain.images import decode_image
from mmtrain.loader_settings import LoaderSettings, loader_settings
from mmtrain.resilience import ignore_stop_signals, reap_workers_at_exit
from mmtrain.sources import load_raw
from mmtrain.tokenizer import build_tokenizer, encode, load_tokenizer

if TYPE_CHECKING:  # inference imports this module and must not pull in accelerate
    from accelerate import Accelerator

VAL_SPLIT_NAMES = ("validation", "valid", "val", "test")

# Below this many images one process checks them; above, the check is worth datasets' worker pool.
PARALLEL_CHECK_ROWS = 10_000
# How many unreadable samples an error or warning names before "and N more".
NAMED_BAD_SAMPLES = 3


@dataclass
class Splits:
    """What ``load_splits`` returns. Unpacks as ``train, val``; ``skipped`` names the samples whose
    image could not be read and that ``data.skip_bad_samples`` dropped (empty otherwise), and
    ``skipped_reasons`` says why, in the same order."""

    train: Any
    val: Any
    skipped: tuple[str, ...] = ()
    skipped_reasons: tuple[str, ...] = ()

    def __iter__(self) -> Iterator[Any]:
        return iter((self.train, self.val))


def _split_names(raw: Any, cfg: DataConfig) -> tuple[str, str | None]:
    """(train split, validation split), or None for the latter when it is to be held out of train."""
    if cfg.train_split not in raw:
        raise DataError(f"data.train_split={cfg.train_split!r} is not in the dataset (splits: {', '.join(raw)})")
    if cfg.val_split is not None:
        if cfg.val_split not in raw:
            raise DataError(f"data.val_split={cfg.val_split!r} is not in the dataset (splits: {', '.join(raw)})")
        return cfg.train_split, cfg.val_split
    return cfg.train_split, next((n for n in VAL_SPLIT_NAMES if n in raw and n != cfg.train_split), None)


def _hold_out(train: Any, cfg: DataConfig) -> tuple[Any, Any]:
    if len(train) < 2:
        raise DataError(f"data.path={cfg.path!r}: the train split has {len(train)} sample(s); "
                        "cannot hold out a validation split")
    parts = train.train_test_split(test_size=cfg.val_fraction, seed=cfg.split_seed, shuffle=True)
    return parts["train"], parts["test"]


def _sample_names(ds: Any, rows: list[int], split: str, cfg: DataConfig) -> list[str]:
    """How to point the user at samples: the file for an imagefolder, else split and row (plus the
    file name the dataset recorded, when it has one)."""
    import datasets

    values = ds.cast_column("image", datasets.Image(decode=False)).select(rows)["image"] \
        if isinstance(ds.features["image"], datasets.Image) else [None] * len(rows)
    names = []
    for row, value in zip(rows, values, strict=True):
        path = value.get("path") if isinstance(value, dict) else None
        names.append(path if cfg.source == "imagefolder" and path else
                     f"split {split} row {row}" + (f" ({path})" if path else ""))
    return names


def _standardise(ds: Any, cfg: DataConfig, split: str) -> Any:
    """Keep and rename the configured columns to ``image`` / ``caption``, and check the captions."""
    where = f"data ({cfg.source}{', ' + cfg.path if cfg.path else ''}, split {split})"
    for option, column in (("image_column", cfg.image_column), ("caption_column", cfg.caption_column)):
        if column not in ds.column_names:
            raise DataError(f"{where}: column {column!r} (data.{option}) not found; columns are "
                            f"{', '.join(ds.column_names)}. Set --data.{option} to one of them.")
    ds = ds.select_columns([cfg.image_column, cfg.caption_column])
    renames = {c: n for c, n in ((cfg.image_column, "image"), (cfg.caption_column, "caption")) if c != n}
    if renames:
        ds = ds.rename_columns(renames)
    for i, caption in enumerate(ds["caption"]):
        if not isinstance(caption, str) or not caption.strip():
            what = "empty" if isinstance(caption, str) else f"not a string: {caption!r}"
            if cfg.source == "imagefolder":  # the image file is what the user can find in the metadata
                (image_file,) = _sample_names(ds, [i], split, cfg)
                raise DataError(f"{image_file}: its caption ({cfg.caption_column!r} in the metadata) is {what}; "
                                "every image needs a non-empty text caption: fix its metadata line or remove it")
            raise DataError(f"{where}: caption of row {i} in column {cfg.caption_column!r} is {what}; "
                            "every sample needs a non-empty text caption: fix or remove that row")
    return ds


def _decode_errors(images: list[Any]) -> dict[str, list[str]]:
    """For a batch of undecoded images: '' for each that decodes fully, else why it does not.

    Decoded by ``mmtrain.images.viewed_image``, the decoder training and inference use (a full
    decode: opening reads only the header, only decoding finds a truncated file), so an image that
    passes here decodes in training. Whether it decodes does not depend on the model's channels or
    background, so the defaults serve. Module-level and pure so that datasets can hash it: the map
    result is then cached under a fingerprint of the data and this code, and a second run reuses it.
    """
    from mmtrain.images import ImageDecodeError, viewed_image

    errors = []
    for value in images:
        try:
            viewed_image(value).close()
            errors.append("")
        except ImageDecodeError as e:  # the decoder turns every failure into a one-line reason
            errors.append(str(e))
    return {"error": errors}


def _unreadable_images(ds: Any, split: str, cfg: DataConfig) -> list[tuple[int, str]]:
    """(row, reason) for every sample of ``ds`` whose image does not decode."""
    import datasets

    if not isinstance(ds.features["image"], datasets.Image):
        raise DataError(f"data ({cfg.source}, {cfg.path}, split {split}): column {cfg.image_column!r} "
                        f"(data.image_column) holds {ds.features['image']}, not images; set --data.image_column "
                        "to the image column")
    # decode=False hands the map raw bytes/paths, so that one bad file is one row's error string
    # rather than an exception that stops the whole batch; ``ds`` itself keeps decoding.
    raw = ds.cast_column("image", datasets.Image(decode=False))
    checked = raw.map(_decode_errors, batched=True, input_columns="image", remove_columns=raw.column_names,
                      num_proc=min(os.cpu_count() or 1, 8) if len(ds) >= PARALLEL_CHECK_ROWS else None,
                      desc=f"checking {split} images")
    return [(row, error) for row, error in enumerate(checked["error"]) if error]


def _drop_unreadable(parts: dict[str, Any], cfg: DataConfig
                     ) -> tuple[dict[str, Any], tuple[str, ...], tuple[str, ...]]:
    """Check every image of each split: stop naming the first few that cannot be read, or, with
    data.skip_bad_samples, drop them all with one warning. Returns the parts, the dropped names and
    why each could not be read."""
    bad = {split: _unreadable_images(ds, split, cfg) for split, ds in parts.items()}
    if not any(bad.values()):
        return parts, (), ()
    names, reasons = [], []
    for split, rows in bad.items():
        names += _sample_names(parts[split], [row for row, _ in rows], split, cfg)
        reasons += [reason for _, reason in rows]
    total = sum(len(ds) for ds in parts.values())
    more = f" and {len(names) - NAMED_BAD_SAMPLES} more" if len(names) > NAMED_BAD_SAMPLES else ""
    if not cfg.skip_bad_samples:
        listed = ", ".join(f"{n} ({r})" for n, r in zip(names[:NAMED_BAD_SAMPLES], reasons, strict=False))
        what = "files" if cfg.source == "imagefolder" else "samples"
        raise DataError(f"data.path={cfg.path!r}: {len(names)} of {total} images cannot be read: {listed}{more}; "
                        f"remove or replace these {what}, or pass --data.skip_bad_samples true to skip them")
    if os.environ.get("RANK", "0") == "0":  # every rank loads the data; one report per run is enough
        warnings.warn(f"data.skip_bad_samples: skipped {len(names)} of {total} samples whose image cannot be "
                      f"read: {', '.join(names[:NAMED_BAD_SAMPLES])}{more}", stacklevel=3)
    for split, rows in bad.items():
        if rows:
            drop = {row for row, _ in rows}
            parts[split] = parts[split].select([i for i in range(len(parts[split])) if i not in drop])
    return parts, tuple(names), tuple(reasons)


def load_splits(data: DataConfig, model: ModelConfig) -> Splits:
    """(train, validation) datasets with columns ``image`` and ``caption``, as a ``Splits``."""
    import datasets

    raw = load_raw(data, model.image_size)
    if isinstance(raw, datasets.Dataset):
        raw = datasets.DatasetDict({data.train_split: raw})
    train_name, val_name = _split_names(raw, data)
    # Checked before any hold-out split, so that a row index in a message is the row in the user's split.
    parts = {name: _standardise(raw[name], data, name) for name in (train_name, val_name) if name is not None}
    skipped: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    if data.source != "synthetic":  # we draw the synthetic images ourselves; the user's could be anything
        parts, skipped, reasons = _drop_unreadable(parts, data)
    train = parts[train_name]
    train, val = (train, parts[val_name]) if val_name is not None else _hold_out(train, data)
    if len(train) == 0 or len(val) == 0:
        split = "train" if len(train) == 0 else "validation"
        why = f" after skipping {len(skipped)} unreadable image(s)" if skipped else ""
        raise DataError(f"data.path={data.path!r}: the {split} split is empty{why}")
    return Splits(train, val, skipped, reasons)


def image_transform(model: ModelConfig) -> Callable[[Any], torch.Tensor]:
    """Image -> float32 tensor in [0, 1] of shape (C, S, S), C = ``image_channels``, S = ``image_size``:
    the model's view of any image, in training and at inference alike.

    The image (a path, bytes, a ``datasets`` image dict or a PIL image) is decoded by
    :func:`mmtrain.images.decode_image` (EXIF orientation, transparency composited onto
    ``image_background``, every Pillow mode to the values a viewer shows), then goes through the one
    geometric transform: the shorter side resized to S (antialiased bilinear, on the float values, so
    16-bit images keep their precision), then a centre crop to S x S (the longer side loses equal
    margins; the image is never squashed). Raises ``mmtrain.images.ImageDecodeError``.
    """
    return pixel_transform(model.image_size, model.image_channels, model.image_background)


def pixel_transform(image_size: int, channels: int, background: str) -> Callable[[Any], torch.Tensor]:
    """:func:`image_transform` from the three settings it depends on (no ``ModelConfig`` needed: the
    decode cache builds it inside a ``datasets.map`` from hashable arguments)."""
    geometry = v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])

    def transform(image: Any) -> torch.Tensor:
        pixels = decode_image(image, channels, background)
        return geometry(pixels).clamp_(0.0, 1.0)  # bilinear weights are convex; this only absorbs rounding

    return transform


def make_transform(tokenizer: Any, model: ModelConfig) -> Callable[[dict], dict]:
    """Batch transform: image (undecoded ``datasets`` value or PIL image) -> float tensor in [0, 1]
    (C, S, S) by :func:`image_transform`; caption -> ids + mask."""
    to_tensor = image_transform(model)

    def transform(batch: dict) -> dict:
        pixels = [to_tensor(img) for img in batch["image"]]
        enc = encode(tokenizer, list(batch["caption"]), model.max_caption_length)
        return {"pixel_values": pixels, "input_ids": list(enc["input_ids"]),
                "attention_mask": list(enc["attention_mask"])}

    return transform


def undecoded(ds: Any) -> Any:
    """``ds`` with its ``image`` column handed over undecoded (``{"bytes", "path"}`` dicts), for
    :func:`make_transform` to decode with mmtrain's decoder: ``datasets``' own decoder drops alpha and
    reads 16-bit images differently, and predict/retrieve must see what training sees. A cheap cast
    (only the feature's decode flag changes); ``ds`` itself keeps decoding to PIL images."""
    import datasets

    feature = ds.features.get("image")
    if isinstance(feature, datasets.Image) and feature.decode:
        return ds.cast_column("image", datasets.Image(decode=False))
    return ds


def build_dataloader(ds: Any, tokenizer: Any, model: ModelConfig, batch_size: int, num_workers: int,
                     shuffle: bool, seed: int, pin_memory: bool = False, decoded: Any = None) -> DataLoader:
    """A plain torch DataLoader over the lazily transformed dataset; Accelerate shards it later.

    ``decoded``: ``ds`` through :func:`mmtrain.decoded.decode_once` (same rows, pixels already decoded),
    read instead of decoding ``ds`` again; the batches are bit-identical either way. Each worker loads
    torch's default 2 batches ahead (prefetch_factor): with up to 8 workers that is 16 batches in flight."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    if num_workers > 0:
        reap_workers_at_exit()
    view = DecodedSamples(decoded, tokenizer, model) if decoded is not None else \
        undecoded(ds).with_transform(make_transform(tokenizer, model))
    return DataLoader(
        view,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        generator=generator,
        drop_last=False,
        worker_init_fn=ignore_stop_signals,
    )


def fixed_batch(ds: Any, tokenizer: Any, model: ModelConfig, n: int) -> dict:
    """The first ``n`` samples of ``ds`` as one transformed batch (for media that must not change)."""
    view = undecoded(ds).with_transform(make_transform(tokenizer, model))
    return default_collate([view[i] for i in range(min(n, len(ds)))])


@dataclass
class TrainingData:
    """What training reads: both splits, the tokenizer, and their (not yet prepared) loaders."""

    train: Any
    val: Any
    tokenizer: Any
    train_loader: DataLoader
    val_loader: DataLoader
    skipped: int  # samples left out under data.skip_bad_samples
    loader: LoaderSettings | None = None  # how the loaders load (resolved num_workers, pin_memory, decode cache)


def build_data(cfg: Config, accelerator: Accelerator, resume_from: Path | None) -> TrainingData:
    """Load and check the splits, build (or, resuming, load) the tokenizer and the loaders.

    Raises DataError when the training split holds less than one global batch. The main rank
    draws or caches the synthetic set (or downloads) first, and decodes it once under data.decode_cache;
    the others then read its caches. Prints the loader settings used (:class:`LoaderSettings`) once.
    """
    with accelerator.main_process_first():
        splits = load_splits(cfg.data, cfg.model)
    train, val = splits
    global_batch = cfg.train.batch_size * accelerator.num_processes
    if len(train) < global_batch:
        raise DataError(f"the training split has {len(train)} samples, fewer than one global batch "
                        f"(train.batch_size={cfg.train.batch_size} x {accelerator.num_processes} processes); "
                        "lower train.batch_size or add data")
    settings = loader_settings(cfg.data, cfg.model, accelerator.device.type, accelerator.num_processes,
                               len(train) + len(val))
    decoded: list[Any] = [None, None]
    if settings.decode_cache:
        with accelerator.main_process_first():  # the main rank decodes and caches, the others read its cache
            decoded = [decode_once(train, cfg.model, "train"), decode_once(val, cfg.model, "validation")]
    if resume_from is not None:  # the vocabulary the checkpoint's embedding rows belong to
        tokenizer = load_tokenizer(resume_from / "tokenizer")
    else:
        tokenizer = build_tokenizer(train["caption"], cfg.model.max_caption_length, cfg.data.min_word_frequency)
    accelerator.print(settings.line())
    eval_bs = cfg.train.eval_batch_size or cfg.train.batch_size
    loaders = [build_dataloader(ds, tokenizer, cfg.model, bs, settings.num_workers, shuffle=shuffle,
                                seed=cfg.train.seed, pin_memory=settings.pin_memory, decoded=pixels)
               for ds, pixels, bs, shuffle in ((train, decoded[0], cfg.train.batch_size, True),
                                               (val, decoded[1], eval_bs, False))]
    return TrainingData(train, val, tokenizer, *loaders, skipped=len(splits.skipped), loader=settings)


def resumed_position(path: Path, batches: int, saved_batch_size: int, saved_processes: int, batch_size: int,
                     processes: int, train_samples: int, epoch_batches: int) -> int:
    """A checkpoint's position in its epoch, in this run's micro-batches per rank.

    The checkpoint trained ``batches`` micro-batches of ``saved_batch_size`` on each of
    ``saved_processes`` ranks. The seedable sampler's permutation of the epoch does not depend on
    the layout, and Accelerate deals its consecutive batches round-robin (batch i to rank i % W), so
    ``batches`` rounds consumed exactly the first ``batches x saved_batch_size x saved_processes``
    samples of the permutation; skipping that many over ``processes`` ranks of ``batch_size`` continues
    at the next sample. Mid-epoch saves fall on optimizer steps, and a step is one effective batch
    (the same before and after), so the conversion is whole; a position past the epoch's data (saved
    after its last step, whose final round Accelerate pads) becomes this layout's ``epoch_batches``.
    Raises CheckpointError, naming the arithmetic, when it is not a whole number of new rounds."""
    if batches == 0 or (saved_batch_size, saved_processes) == (batch_size, processes):
        return batches
    if batches >= math.ceil(train_samples / (saved_batch_size * saved_processes)):
        return epoch_batches  # saved after the epoch's last step, before its end-of-epoch work
    consumed, per_round = batches * saved_batch_size * saved_processes, batch_size * processes
    if consumed % per_round:
        raise CheckpointError(
            f"{path}: its data position ({batches} batches x train.batch_size {saved_batch_size} x {saved_processes} "
            f"process(es) = {consumed} samples into the epoch) is not a whole number of this run's rounds "
            f"(train.batch_size {batch_size} x {processes} process(es) = {per_round} samples); resume with "
            f"--train.batch_size {saved_batch_size} on {saved_processes} process(es), or from a checkpoint taken at "
            "an epoch end")
    return consumed // per_round
