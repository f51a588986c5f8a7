"""Image-caption data through Hugging Face ``datasets``: sources, splits, lazy transforms, loaders.

Every source ends as two ``datasets.Dataset`` objects with the columns ``image`` and ``caption``.
Decoding, resizing and tokenizing happen lazily in ``with_transform``, inside DataLoader workers,
so nothing is materialised twice and start-up stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, default_collate
from torchvision.transforms import v2

from mmtrain.config import DataConfig, ModelConfig
from mmtrain.errors import DataError
from mmtrain.tokenizer import encode

VAL_SPLIT_NAMES = ("validation", "valid", "val", "test")


def _load_raw(cfg: DataConfig, image_size: int) -> Any:
    import datasets

    if cfg.source == "synthetic":
        from mmtrain.synthetic import synthetic_dataset

        return synthetic_dataset(cfg.synthetic_train_size, cfg.synthetic_val_size, image_size,
                                 cfg.synthetic_seed, cfg.resolved_cache_dir())
    path = str(Path(cfg.path).expanduser()) if cfg.source != "hub" else cfg.path
    try:
        if cfg.source == "imagefolder":
            return datasets.load_dataset("imagefolder", data_dir=path)
        if cfg.source == "disk":
            return datasets.load_from_disk(path)
        return datasets.load_dataset(path)
    except Exception as e:  # datasets raises many types; the user needs the reason, not the stack
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = {
            "imagefolder": "it must hold image files plus metadata.jsonl or metadata.csv with a file_name column",
            "disk": "it must be a folder written by datasets' save_to_disk",
            "hub": "hub datasets need network access; where there is none, save the dataset with "
                   "save_to_disk elsewhere and use data.source=disk",
        }[cfg.source]
        raise DataError(f"data.path={cfg.path!r}: could not load it as {cfg.source} ({reason}); {hint}") from None


def _split(raw: Any, cfg: DataConfig) -> tuple[Any, Any]:
    import datasets

    if isinstance(raw, datasets.Dataset):
        raw = datasets.DatasetDict({cfg.train_split: raw})
    if cfg.train_split not in raw:
        raise DataError(f"data.train_split={cfg.train_split!r} is not in the dataset (splits: {', '.join(raw)})")
    if cfg.val_split is not None:
        if cfg.val_split not in raw:
            raise DataError(f"data.val_split={cfg.val_split!r} is not in the dataset (splits: {', '.join(raw)})")
        return raw[cfg.train_split], raw[cfg.val_split]
    for name in VAL_SPLIT_NAMES:
        if name in raw and name != cfg.train_split:
            return raw[cfg.train_split], raw[name]
    if len(raw[cfg.train_split]) < 2:
        raise DataError(f"data.path={cfg.path!r}: the train split has {len(raw[cfg.train_split])} sample(s); "
                        "cannot hold out a validation split")
    parts = raw[cfg.train_split].train_test_split(test_size=cfg.val_fraction, seed=cfg.split_seed, shuffle=True)
    return parts["train"], parts["test"]


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
            raise DataError(f"{where}: caption of row {i} in column {cfg.caption_column!r} is "
                            f"{'empty' if isinstance(caption, str) else 'not a string: ' + repr(caption)}; "
                            "every sample needs a non-empty text caption")
    return ds


def load_splits(data: DataConfig, model: ModelConfig) -> tuple[Any, Any]:
    """(train, validation) datasets with columns ``image`` and ``caption``."""
    raw = _load_raw(data, model.image_size)
    train, val = _split(raw, data)
    train, val = _standardise(train, data, "train"), _standardise(val, data, "validation")
    if len(train) == 0 or len(val) == 0:
        raise DataError(f"data: the {'train' if len(train) == 0 else 'validation'} split is empty")
    return train, val


def image_transform(model: ModelConfig) -> Callable[[Any], torch.Tensor]:
    """PIL image -> float tensor in [0, 1] of shape (C, S, S): the model's view of any image,
    in training and at inference alike (gray or RGB per ``image_channels``, resize, centre crop)."""
    pipeline = v2.Compose([
        v2.Resize(model.image_size, antialias=True),
        v2.CenterCrop(model.image_size),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
    ])
    mode = "L" if model.image_channels == 1 else "RGB"
    return lambda image: pipeline(image.convert(mode))


def make_transform(tokenizer: Any, model: ModelConfig) -> Callable[[dict], dict]:
    """Batch transform: PIL image -> float tensor in [0, 1] (C, S, S); caption -> ids + mask."""
    to_tensor = image_transform(model)

    def transform(batch: dict) -> dict:
        pixels = [to_tensor(img) for img in batch["image"]]
        enc = encode(tokenizer, list(batch["caption"]), model.max_caption_length)
        return {"pixel_values": pixels, "input_ids": list(enc["input_ids"]),
                "attention_mask": list(enc["attention_mask"])}

    return transform


def build_dataloader(ds: Any, tokenizer: Any, model: ModelConfig, batch_size: int, num_workers: int,
                     shuffle: bool, seed: int, pin_memory: bool = False) -> DataLoader:
    """A plain torch DataLoader over the lazily transformed dataset; Accelerate shards it later."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        ds.with_transform(make_transform(tokenizer, model)),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        generator=generator,
        drop_last=False,
    )


def fixed_batch(ds: Any, tokenizer: Any, model: ModelConfig, n: int) -> dict:
    """The first ``n`` samples of ``ds`` as one transformed batch (for media that must not change)."""
    view = ds.with_transform(make_transform(tokenizer, model))
    return default_collate([view[i] for i in range(min(n, len(ds)))])
