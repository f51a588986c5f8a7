"""Raw sources for ``mmtrain.data``: load an imagefolder, save_to_disk folder, hub dataset or the
built-in synthetic set as ``datasets`` returns it, and turn ``datasets``' failures into one-line
``DataError`` messages that name the user's file and the fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmtrain.config import DataConfig
from mmtrain.errors import DataError


def _require_image_files(folder: Path, cfg: DataConfig) -> None:
    """An imagefolder without images loads as metadata rows pointing at nothing (or fails with a
    message about 'data files'); say what the folder must hold instead."""
    from PIL import Image

    extensions = set(Image.registered_extensions())  # the list datasets' ImageFolder is built from
    if any(p.suffix.lower() in extensions for p in folder.rglob("*") if p.is_file()):
        return
    found = sorted(p.name for p in folder.iterdir())
    holds = f"it holds only {', '.join(found[:5])}{' ...' if len(found) > 5 else ''}" if found else "it is empty"
    raise DataError(f"data.path={cfg.path!r}: no image files in this folder ({holds}); an imagefolder must hold "
                    f"the images (.png, .jpg, ...) plus metadata.jsonl or metadata.csv with a file_name column "
                    f"and a {cfg.caption_column!r} column (data.caption_column)")


def _metadata_problem(folder: Path, caption_column: str) -> str | None:
    """The first line of a metadata.jsonl that datasets cannot read into a caption column, named by
    file and line: pyarrow's own message gives neither (e.g. 'changed from string to number in row 1')."""
    for meta in sorted(folder.rglob("metadata.jsonl")):
        for n, line in enumerate(meta.read_text(errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                return f"{meta}: line {n} is not valid JSON ({e.msg}); write one JSON object per line"
            if not isinstance(record, dict):
                return f"{meta}: line {n} is not a JSON object; write one {{\"file_name\": ..., ...}} per line"
            caption = record.get(caption_column)
            if caption is not None and not isinstance(caption, str):
                return (f"{meta}: line {n}: {caption_column!r} is {caption!r}, not a string; every caption "
                        f"must be a JSON string (write \"{caption}\" in quotes)")
    return None


def load_raw(cfg: DataConfig, image_size: int) -> Any:
    """The source as datasets loads it: a ``DatasetDict`` of splits, or one ``Dataset``."""
    import datasets

    if cfg.source == "synthetic":
        from mmtrain.synthetic import synthetic_dataset

        return synthetic_dataset(cfg.synthetic_train_size, cfg.synthetic_val_size, image_size,
                                 cfg.synthetic_seed, cfg.resolved_cache_dir())
    path = str(Path(cfg.path).expanduser()) if cfg.source != "hub" else cfg.path
    if cfg.source == "imagefolder":
        _require_image_files(Path(path), cfg)
    try:
        if cfg.source == "imagefolder":
            return datasets.load_dataset("imagefolder", data_dir=path)
        if cfg.source == "disk":
            return datasets.load_from_disk(path)
        return datasets.load_dataset(path)
    except Exception as e:  # datasets raises many types; the user needs the reason, not the stack
        problem = _metadata_problem(Path(path), cfg.caption_column) if cfg.source == "imagefolder" else None
        if problem:
            raise DataError(problem) from None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = {
            "imagefolder": "it must hold image files plus metadata.jsonl or metadata.csv with a file_name column",
            "disk": "it must be a folder written by datasets' save_to_disk",
            "hub": "hub datasets need network access; where there is none, save the dataset with "
                   "save_to_disk elsewhere and use data.source=disk",
        }[cfg.source]
        raise DataError(f"data.path={cfg.path!r}: could not load it as {cfg.source} ({reason}); {hint}") from None
