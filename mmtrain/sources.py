"""Raw sources for ``mmtrain.data``: an imagefolder, save_to_disk folder, hub dataset or the synthetic
set as ``datasets`` returns it, with ``datasets``' failures turned into one-line ``DataError`` messages.

An image folder's splits are whatever ``datasets`` infers from split words (train, test, valid, ...) in
its folder and file names, and each split reads only the metadata files among its own files: so
``sketches/`` + ``test_prints/`` + a top-level ``metadata.jsonl`` loads as a caption-less ``test`` split of
``test_prints/`` alone. ``load_raw`` asks ``datasets`` (its own pattern functions, not a copy of its
rules) what it would infer, and where that loses images or captions loads the folder itself and says
so, or stops naming the layout to use."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from mmtrain.config import DataConfig
from mmtrain.errors import DataError
from mmtrain.imagefolder import (
    FolderSplits,
    and_more,
    count_of,
    inference_of,
    inspect_imagefolder,
    name_files,
    name_places,
)
from mmtrain.images import image_extensions

# What a split layout datasets reads as intended looks like; named in every message about splits.
SPLIT_LAYOUT = ("put the images in train/ and validation/ (or test/) folders, each with its own metadata.jsonl "
                "whose file_name is relative to that folder")


def _require_image_files(folder: Path, cfg: DataConfig) -> None:
    """An imagefolder without images loads as metadata rows pointing at nothing (or fails with a
    message about 'data files'); say what the folder must hold instead."""
    extensions = image_extensions()
    if any(p.suffix.lower() in extensions for p in folder.rglob("*") if p.is_file()):
        return
    found = sorted(p.name for p in folder.iterdir())
    holds = f"it holds only {', '.join(found[:5])}{' ...' if len(found) > 5 else ''}" if found else "it is empty"
    raise DataError(f"data.path={cfg.path!r}: no image files in this folder ({holds}); an imagefolder must hold "
                    f"the images (.png, .jpg, ...) plus metadata.jsonl or metadata.csv with a file_name column "
                    f"and a {cfg.caption_column!r} column (data.caption_column)")


def jsonl_problem(file: Path, example: str, caption_column: str | None = None) -> str | None:
    """The first line of a JSON-lines file that is not a JSON object (or whose ``caption_column``, if
    given, holds something other than a string), as "line N ..." without the file name, or None.
    UTF-8 with or without a BOM, as datasets reads it. ``example`` is the object shown in the fix.
    Used where datasets' own message names neither file nor line (e.g. 'changed from string to
    number in row 1', a row within a block)."""
    try:
        text = file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return f"not UTF-8 text (byte {e.start})"
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {n} is not valid JSON ({e.msg}); write one JSON object per line"
        if not isinstance(record, dict):
            return f"line {n} is not a JSON object; write one {example} per line"
        caption = record.get(caption_column) if caption_column else None
        if caption is not None and not isinstance(caption, str):
            return (f"line {n}: {caption_column!r} is {caption!r}, not a string; every caption "
                    f"must be a JSON string (write \"{caption}\" in quotes)")
    return None


def _metadata_problem(folder: Path, caption_column: str) -> str | None:
    """The first problem :func:`jsonl_problem` finds in the folder's metadata.jsonl files, named by file."""
    for meta in sorted(folder.rglob("metadata.jsonl")):
        problem = jsonl_problem(meta, '{"file_name": ..., ...}', caption_column)
        if problem:
            return f"{meta}: {problem}"
    return None


def _check_split_names(layout: FolderSplits, cfg: DataConfig) -> None:
    """The train split, and the validation split if set, must be among the inferred splits: say which
    folders those came from, which data.py's later check cannot. The validation choices offered never
    include the train split (the config refuses val_split == train_split)."""
    splits, train_ok = list(layout.splits), cfg.train_split in layout.splits
    bad = [f"data.{o}={v!r}" for o, v in (("train_split", cfg.train_split), ("val_split", cfg.val_split))
           if v not in (None, *splits)]
    if not bad:
        return

    def pick(option: str, names: list[str]) -> str:
        return f"pass --data.{option} {names[0] if len(names) == 1 else 'with one of ' + ', '.join(names)}"

    advice = [] if train_ok else [pick("train_split", [s for s in splits if s != cfg.val_split] or splits)]
    if len(splits) == 1:  # nothing else to validate on: a held-out part of the one split is what is left
        advice.append(f"{'leave data.val_split unset' if cfg.val_split is None else 'remove data.val_split'} "
                      f"to hold out --data.val_fraction of it for validation")
    elif cfg.val_split is not None and cfg.val_split not in layout.splits:
        advice.append(pick("val_split", [s for s in splits if s != cfg.train_split]) if train_ok
                      else "--data.val_split with another of them")
    raise DataError(f"data.path={cfg.path!r}: {' and '.join(bad)} is not among the splits: {inference_of(layout)}. "
                    f"To load this folder, {' and '.join(advice)}; or {SPLIT_LAYOUT}.")


def _warn(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # every rank loads the data; one warning per run is enough
        # 6: _warn <- _load_* or _warn_unlisted <- _load_imagefolder <- load_raw <- data.load_splits <- its caller
        warnings.warn(message, stacklevel=6)


def _image_paths(ds: Any) -> list[str | None]:
    """The file behind each row's image (None where a row names none), normalised like FolderSplits."""
    import datasets

    column = next((c for c, f in ds.features.items() if isinstance(f, datasets.Image)), None)
    if column is None:
        return [None] * len(ds)
    values = ds.cast_column(column, datasets.Image(decode=False))[column]
    return [os.path.normpath(v["path"]) if isinstance(v, dict) and v.get("path") else None for v in values]


def _warn_unlisted(layout: FolderSplits | None, raw: Any, cfg: DataConfig) -> None:
    """Image files no metadata file lists, which datasets drops without a word (its rows are metadata
    lines), named with the line to add. From inspect_imagefolder's one listing: no second walk."""
    if layout is None or not layout.metadata:
        return  # without metadata every image is a row (and data.py asks for the caption column)
    unlisted = sorted(layout.images.difference(f for split in raw.values() for f in _image_paths(split)))
    if not unlisted:
        return
    dirs = {os.path.dirname(m): m for m in layout.metadata}
    # A file's line goes in the nearest metadata file above it (or in a new one beside it).
    meta = {f: next((dirs[str(d)] for d in Path(f).parents if str(d) in dirs), os.path.dirname(f) + "/metadata.jsonl")
            for f in unlisted}
    name = os.path.relpath(unlisted[0], os.path.dirname(meta[unlisted[0]]))
    line = json.dumps({"file_name": name, cfg.caption_column: "..."}) if meta[unlisted[0]].endswith(".jsonl") \
        else f"{name},..."
    it = "it" if len(unlisted) == 1 else "them"
    _warn(f"data.path={cfg.path!r}: {count_of(len(unlisted), 'image file')} of {len(layout.images)} not listed in "
          f"any metadata file, so datasets drops {it} and mmtrain neither trains nor validates on {it}: "
          f"{name_files(unlisted, layout.base)}. To use {it}, add a line {'for each ' * (it == 'them')}to "
          f"{name_files(sorted(set(meta.values())), layout.base)} with its file_name (relative to that file's folder) "
          f"and {cfg.caption_column!r}, e.g. {line}; to leave {it} out without this warning, move {it} out of "
          f"data.path.")


def _load_everything(path: str) -> Any:
    """The whole folder as one ``train`` split. "**" is the pattern datasets itself uses for a folder
    without split words, so every metadata file is read and each row's file_name stays relative to
    its own metadata file's folder ('sketches/a.png' in a top-level metadata.jsonl resolves)."""
    import datasets

    return datasets.load_dataset("imagefolder", data_dir=path, data_files={"train": "**"})


def _load_as_one_split(path: str, layout: FolderSplits, cfg: DataConfig) -> Any:
    """Images left out of every inferred split: load all of them as one train split, and say so, with
    what to rename for datasets to infer no splits: each split's names that carry its word (see
    FolderSplits.trigger), and the metadata files above them, whose file_name entries go through them."""
    raw = _load_everything(path)
    left = name_places(layout.left_out_images, layout.base)
    if layout.unattached_metadata:
        left += f" and {name_files(layout.unattached_metadata, layout.base)}"
    names = {s: sorted({layout.trigger(s, f) for f in layout.splits[s]}) for s in layout.splits}
    renamed = {n for s in layout.splits for f in layout.images_of(s) for n in layout.trigger(s, f).split(" and ")}
    metas = [m for m in sorted(layout.metadata) for d in [os.path.dirname(os.path.relpath(m, layout.base))]
             if any(name.rstrip("/") != d and name.startswith(f"{d}/" if d else "") for name in renamed)]
    one = len({n for joined in names.values() for j in joined for n in j.split(" and ")}) == 1
    update = (f", and change {'it' if one else 'them'} to the new {'name' if one else 'names'} in the file_name "
              f"entries of {name_files(metas, layout.base)}") if metas else ""
    _warn(f"data.path={cfg.path!r}: {inference_of(layout)}; that leaves out {left}. mmtrain loaded the whole folder "
          f"as one train split instead ({count_of(raw['train'].num_rows, 'sample')}) and holds out "
          f"data.val_fraction={cfg.val_fraction} of it for validation. For named splits, {SPLIT_LAYOUT} "
          f"(--data.val_split picks the one to validate on); to keep one split without this warning, rename "
          f"{' and '.join(f'{and_more(n)} ({s} split)' for s, n in names.items())} to "
          f"{'a name' if one else 'names'} without a split word{update}.")
    return raw


def _load_regrouped(path: str, layout: FolderSplits, cfg: DataConfig) -> Any:
    """Every image is in an inferred split, but a metadata file outside them holds the captions of
    some: keep datasets' splits and give each metadata row to the split its image file is in (the
    first one, for a file under two split words, as inference_of says)."""
    import datasets

    everything = _load_everything(path)["train"]
    # A row whose file is in no split names a missing file: data.load_splits' image check reports it.
    default = cfg.train_split if cfg.train_split in layout.splits else next(iter(layout.splits))
    rows: dict[str, list[int]] = {split: [] for split in layout.splits}
    for row, file in enumerate(_image_paths(everything)):
        rows[layout.owner.get(file or "", default)].append(row)
    for split in layout.splits:
        if layout.images_of(split, owned=True) and not rows[split]:
            raise DataError(
                f"data.path={cfg.path!r}: {inference_of(layout)}. No metadata file lists an image of split {split}, "
                f"so it has no captions. List them in {name_files(layout.unattached_metadata, layout.base)}, "
                f"or {SPLIT_LAYOUT}.")
    unattached = name_files(layout.unattached_metadata, layout.base)
    counts = ", ".join(f"{split} {count_of(len(r), 'sample')}" for split, r in rows.items() if r)
    _warn(f"data.path={cfg.path!r}: {inference_of(layout)}. It reads a metadata file only for the split whose files "
          f"include it, and {unattached} is in no split, so {' and '.join(layout.captionless)} would have no "
          f"captions. mmtrain read {unattached} itself and gave each row to the split its image is in "
          f"({counts}). To load this folder without this warning, {SPLIT_LAYOUT}.")
    return datasets.DatasetDict({split: everything.select(r) for split, r in rows.items() if r})


def _load_imagefolder(path: str, cfg: DataConfig) -> Any:
    """``load_dataset("imagefolder", data_dir=path)`` where datasets' split inference keeps every
    image and caption (the standard layouts, loaded exactly as before); otherwise the folder loaded
    by mmtrain with one warning, or a DataError when the user asked for splits the folder lacks.
    Either way, images no metadata file lists get a warning of their own."""
    import datasets

    layout = inspect_imagefolder(path)
    if layout is None or layout.consistent:
        if layout is not None:
            _check_split_names(layout, cfg)
        raw = datasets.load_dataset("imagefolder", data_dir=path)
    elif layout.left_out_images:
        defaults = DataConfig.__dataclass_fields__
        asked = [f"data.{o}={getattr(cfg, o)!r}" for o in ("train_split", "val_split")
                 if getattr(cfg, o) != defaults[o].default]  # only options the user set make this an error
        if asked:
            raise DataError(
                f"data.path={cfg.path!r}: {' and '.join(asked)} cannot be used: {inference_of(layout)}; that leaves "
                f"out {name_places(layout.left_out_images, layout.base)}. For named splits, {SPLIT_LAYOUT}, and pass "
                f"those names; or leave data.train_split and data.val_split unset to load the whole folder as one "
                f"train split with data.val_fraction held out for validation.")
        raw = _load_as_one_split(path, layout, cfg)
    elif not layout.unattached_metadata:  # the captions of a split's images are nowhere in the folder
        split = layout.captionless[0]
        folders = {os.path.dirname(os.path.relpath(f, layout.base)) for f in layout.images_of(split)}
        common = os.path.commonpath(sorted(folders)) if "" not in folders else ""
        target = f"{common}/metadata.jsonl" if common else "a metadata.jsonl beside them"
        raise DataError(
            f"data.path={cfg.path!r}: {inference_of(layout)}. It reads a metadata file only for the split whose "
            f"files include it, so split {split} has no captions. Add {target} listing "
            f"its images (file_name relative to that folder), or {SPLIT_LAYOUT}.")
    else:
        _check_split_names(layout, cfg)
        raw = _load_regrouped(path, layout, cfg)
    _warn_unlisted(layout, raw, cfg)
    return raw


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
            return _load_imagefolder(path, cfg)
        if cfg.source == "disk":
            return datasets.load_from_disk(path)
        return datasets.load_dataset(path)
    except DataError:  # already says what is wrong and how to fix it
        raise
    except Exception as e:  # datasets raises many types; the user needs the reason, not the stack
        problem = _metadata_problem(Path(path), cfg.caption_column) if cfg.source == "imagefolder" else None
        if problem:
            raise DataError(problem) from None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = {"imagefolder": "it must hold image files plus metadata.jsonl or metadata.csv with a file_name column",
                "disk": "it must be a folder written by datasets' save_to_disk",
                "hub": "hub datasets need network access; where there is none, save the dataset with "
                       "save_to_disk elsewhere and use data.source=disk"}[cfg.source]
        raise DataError(f"data.path={cfg.path!r}: could not load it as {cfg.source} ({reason}); {hint}") from None
