"""Raw sources for ``mmtrain.data``: load an imagefolder, save_to_disk folder, hub dataset or the
built-in synthetic set as ``datasets`` returns it, and turn ``datasets``' failures into one-line
``DataError`` messages that name the user's file and the fix.

An image folder's splits are whatever ``datasets`` infers from split words (train, test, valid, ...)
in its folder and file names, and each split reads only the metadata files among its own files. A
folder such as ``sketches/`` + ``test_prints/`` + a top-level ``metadata.jsonl`` therefore loads as a
caption-less ``test`` split of ``test_prints/`` alone. ``load_raw`` asks ``datasets`` (its own pattern
functions, not a copy of its rules) what it would infer, compares that with the files the folder
holds, and when they differ loads the folder itself and says so, or stops naming the layout to use.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mmtrain.config import DataConfig
from mmtrain.errors import DataError

# What a split layout datasets reads as intended looks like; named in every message about splits.
SPLIT_LAYOUT = ("put the images in train/ and validation/ (or test/) folders, each with its own metadata.jsonl "
                "whose file_name is relative to that folder")
# How many folders or files a message names before "and N more".
NAMED_PLACES = 4


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


@dataclass(frozen=True)
class FolderSplits:
    """What ``datasets`` would make of an image folder, beside what the folder holds.

    Paths are absolute and normalised, as ``datasets`` resolves them, so the two can be compared.
    """

    base: str
    images: frozenset[str]  # every file datasets' ImageFolder reads as an image
    metadata: frozenset[str]  # every metadata.csv / metadata.jsonl / metadata.parquet
    splits: dict[str, tuple[str, ...]]  # each split datasets infers -> its files, in datasets' order

    def images_of(self, split: str) -> list[str]:
        """The image files datasets puts in ``split``."""
        return [f for f in self.splits[split] if f in self.images]

    def metadata_of(self, split: str) -> list[str]:
        """The metadata files ``split`` reads: only those among its own files."""
        return [f for f in self.splits[split] if f in self.metadata]

    @property
    def left_out_images(self) -> list[str]:
        """Image files in no inferred split: datasets would drop them without a word."""
        return sorted(self.images.difference(*self.splits.values()))

    @property
    def unattached_metadata(self) -> list[str]:
        """Metadata files in no inferred split: datasets reads none of their rows."""
        return sorted(self.metadata.difference(*self.splits.values()))

    @property
    def captionless(self) -> list[str]:
        """Splits with images but no metadata file of their own, in a folder that has metadata: datasets
        would give them no caption column (or, beside a split that has metadata, no rows at all)."""
        if not self.metadata:
            return []  # a folder without any metadata has no captions anywhere; data.py names the column
        return [s for s in self.splits if self.images_of(s) and not self.metadata_of(s)]

    @property
    def consistent(self) -> bool:
        """True when loading the folder as datasets infers it keeps every image and every caption."""
        return not self.left_out_images and not self.captionless


def inspect_imagefolder(path: str) -> FolderSplits | None:
    """The splits ``datasets.load_dataset("imagefolder", data_dir=path)`` would infer, through datasets'
    own pattern functions (its split words change between versions; copying them would drift), next
    to the folder's files. None when datasets finds no files at all: its own load then says so."""
    from datasets.data_files import DataFilesDict, get_data_patterns, resolve_pattern
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    base = Path(path).expanduser().resolve().as_posix()  # what datasets resolves data_dir to
    try:
        every = resolve_pattern("**", base)  # "**" is datasets' own everything-pattern: same hidden-file rules
    except FileNotFoundError:
        return None
    norm = os.path.normpath
    layout = FolderSplits(
        base=base,
        images=frozenset(norm(f) for f in every if os.path.splitext(f)[1].lower() in ImageFolder.EXTENSIONS),
        metadata=frozenset(norm(f) for f in every if os.path.basename(f) in ImageFolder.METADATA_FILENAMES),
        splits=_splits_from_listing(base, every) or {},
    )
    if layout.splits and layout.consistent:
        return layout
    # datasets' own way walks the whole folder once per pattern (seconds per 10k files, the cost
    # its load pays again); worth it only before mmtrain departs from what datasets does.
    try:
        inferred = DataFilesDict.from_patterns(get_data_patterns(base), base_path=base)
    except (FileNotFoundError, ValueError):
        return None
    return replace(layout, splits={str(name): tuple(norm(f) for f in files) for name, files in inferred.items()})


def _splits_from_listing(base: str, files: list[str]) -> dict[str, tuple[str, ...]] | None:
    """datasets' split inference run on one listing of the folder instead of one walk per pattern:
    its own pattern search (``_get_data_files_patterns``) with a resolver that matches each pattern
    the way fsspec's glob does (``glob_translate``), against ``files`` (already filtered by datasets'
    hidden-file rules). None where either private helper is missing in this datasets/fsspec."""
    import re

    try:
        from datasets.data_files import _get_data_files_patterns
        from fsspec.utils import glob_translate
    except ImportError:
        return None

    def matching(pattern: str) -> list[str]:
        regex = re.compile(glob_translate(f"{base}/{pattern}"))
        return [f for f in files if regex.match(f)]

    def resolver(pattern: str) -> list[str]:
        found = matching(pattern)
        if not found:
            raise FileNotFoundError(pattern)  # what datasets' resolve_pattern raises for no match
        return found

    try:
        patterns = _get_data_files_patterns(resolver)
    except (FileNotFoundError, ValueError):
        return None
    return {str(split): tuple(os.path.normpath(f) for f in dict.fromkeys(f for p in split_patterns
                                                                         for f in matching(p)))
            for split, split_patterns in patterns.items()}


def _count(n: int, what: str = "image") -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _more(names: list[str]) -> str:
    """The first few names, then how many more: messages stay one readable line for any folder."""
    extra = len(names) - NAMED_PLACES
    return ", ".join(names[:NAMED_PLACES]) + (f" and {extra} more" if extra > 0 else "")


def _places(images: list[str], base: str, counts: bool = True) -> str:
    """Image files as the user sees them: by folder ('sketches/ (30 images)'), top-level ones by name."""
    folders: dict[str, int] = Counter()
    top: list[str] = []
    for f in sorted(images):
        rel = os.path.relpath(f, base)
        parent = os.path.dirname(rel)
        if parent:
            folders[parent + "/"] += 1
        else:
            top.append(rel)
    named = [f"{folder} ({_count(n)})" if counts else folder for folder, n in sorted(folders.items())]
    if len(top) == 1 or (top and not counts):
        named += top
    elif top:
        named.append(f"{_count(len(top), 'top-level image')} ({_more(top)})")
    return _more(named) if named else "no images"


def _files(paths: list[str], base: str) -> str:
    return _more([os.path.relpath(f, base) for f in sorted(paths)])


def _inferred(layout: FolderSplits) -> str:
    """'test from test_prints/ (10 images) with no metadata file; ...': each split datasets infers."""
    parts = []
    for split in layout.splits:
        meta, images = layout.metadata_of(split), layout.images_of(split)
        if not images:  # e.g. a notes file datasets matched by name: name the file itself
            parts.append(f"{split} from {_files(list(layout.splits[split]), layout.base)} (no image files)")
            continue
        reads = f"reading {_files(meta, layout.base)}" if meta else "with no metadata file"
        parts.append(f"{split} from {_places(images, layout.base)} {reads}")
    return "; ".join(parts)


def _inference(layout: FolderSplits) -> str:
    """How datasets split this folder, the opening of every message about it."""
    from datasets.data_files import SPLIT_KEYWORDS

    words = ", ".join(word for words in SPLIT_KEYWORDS.values() for word in words)
    return (f"datasets infers an image folder's splits from split words in its folder and file names ({words}); "
            f"here: {_inferred(layout)}")


def _requested(cfg: DataConfig) -> list[str]:
    """The split options the user set; only these make an unusable split inference an error."""
    asked = []
    if cfg.train_split != DataConfig.__dataclass_fields__["train_split"].default:
        asked.append(f"data.train_split={cfg.train_split!r}")
    if cfg.val_split is not None:
        asked.append(f"data.val_split={cfg.val_split!r}")
    return asked


def _check_split_names(layout: FolderSplits, cfg: DataConfig) -> None:
    """The train split, and the validation split if set, must be among the inferred splits: say which
    folders those came from, which data.py's later check cannot."""
    missing = [f"data.{option}={name!r}" for option, name in (("train_split", cfg.train_split),
                                                                  ("val_split", cfg.val_split))
               if name is not None and name not in layout.splits]
    if missing:
        raise DataError(f"data.path={cfg.path!r}: {' and '.join(missing)} is not among the splits: "
                        f"{_inference(layout)}. Pass --data.train_split / --data.val_split with one of "
                        f"{', '.join(layout.splits)}, or {SPLIT_LAYOUT}.")


def _warn(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # every rank loads the data; one warning per run is enough
        # 6: _warn <- _load_* <- _load_imagefolder <- load_raw <- data.load_splits <- its caller
        warnings.warn(message, stacklevel=6)


def _image_paths(ds: Any) -> list[str | None]:
    """The file behind each row's image (None where a row names none), normalised like FolderSplits."""
    import datasets

    column = next((c for c, f in ds.features.items() if isinstance(f, datasets.Image)), None)
    if column is None:
        return [None] * len(ds)
    values = ds.cast_column(column, datasets.Image(decode=False))[column]
    return [os.path.normpath(v["path"]) if isinstance(v, dict) and v.get("path") else None for v in values]


def _load_everything(path: str) -> Any:
    """The whole folder as one ``train`` split. "**" is the pattern datasets itself uses for a folder
    without split words, so every metadata file is read and each row's file_name stays relative to
    its own metadata file's folder ('sketches/a.png' in a top-level metadata.jsonl resolves)."""
    import datasets

    return datasets.load_dataset("imagefolder", data_dir=path, data_files={"train": "**"})


def _load_as_one_split(path: str, layout: FolderSplits, cfg: DataConfig) -> Any:
    """Images left out of every inferred split: load all of them as one train split, and say so."""
    raw = _load_everything(path)
    unlisted = sorted(layout.images.difference(_image_paths(raw["train"])))
    left = _places(layout.left_out_images, layout.base)
    if layout.unattached_metadata:
        left += f" and {_files(layout.unattached_metadata, layout.base)}"
    also = (f"; {_count(len(unlisted), 'image file')} that no metadata file lists stay out "
            f"({_places(unlisted, layout.base)})") if unlisted and layout.metadata else ""
    # What made datasets see splits: the split's images, or its files when it has none (instruction.md)
    triggers = ", ".join(_places(layout.images_of(s), layout.base, counts=False) if layout.images_of(s)
                         else _files(list(layout.splits[s]), layout.base) for s in layout.splits)
    loaded = _count(raw["train"].num_rows, "sample")
    _warn(f"data.path={cfg.path!r}: {_inference(layout)}; that leaves out {left}. mmtrain loaded the whole folder "
          f"as one train split instead ({loaded}{also}) and holds out data.val_fraction={cfg.val_fraction} of it "
          f"for validation. For named splits, {SPLIT_LAYOUT} "
          f"(--data.val_split picks the one to validate on); to keep one split without this warning, rename or "
          f"move {triggers} so that datasets infers no splits from the names.")
    return raw


def _load_regrouped(path: str, layout: FolderSplits, cfg: DataConfig) -> Any:
    """Every image is in an inferred split, but a metadata file outside them holds the captions of
    some: keep datasets' splits and give each metadata row to the split its image file is in."""
    import datasets

    everything = _load_everything(path)["train"]
    split_of = {f: split for split, files in layout.splits.items() for f in files}
    # A row whose file is in no split names a missing file: data.load_splits' image check reports it.
    default = cfg.train_split if cfg.train_split in layout.splits else next(iter(layout.splits))
    rows: dict[str, list[int]] = {split: [] for split in layout.splits}
    for row, file in enumerate(_image_paths(everything)):
        rows[split_of.get(file or "", default)].append(row)
    for split in layout.splits:
        if layout.images_of(split) and not rows[split]:
            raise DataError(
                f"data.path={cfg.path!r}: {_inference(layout)}. No metadata file lists an image of split {split}, "
                f"so it has no captions. List them in {_files(layout.unattached_metadata, layout.base)}, "
                f"or {SPLIT_LAYOUT}.")
    unattached = _files(layout.unattached_metadata, layout.base)
    counts = ", ".join(f"{split} {_count(len(r), 'sample')}" for split, r in rows.items())
    _warn(f"data.path={cfg.path!r}: {_inference(layout)}. It reads a metadata file only for the split whose files "
          f"include it, and {unattached} is in no split, so {' and '.join(layout.captionless)} would have no "
          f"captions. mmtrain read {unattached} itself and gave each row to the split its image is in "
          f"({counts}). To load this folder without this warning, {SPLIT_LAYOUT}.")
    return datasets.DatasetDict({split: everything.select(r) for split, r in rows.items() if r})


def _load_imagefolder(path: str, cfg: DataConfig) -> Any:
    """``load_dataset("imagefolder", data_dir=path)`` where datasets' split inference keeps every
    image and caption (the standard layouts, loaded exactly as before); otherwise the folder loaded
    by mmtrain with one warning, or a DataError when the user asked for splits the folder lacks."""
    import datasets

    layout = inspect_imagefolder(path)
    if layout is None or layout.consistent:
        if layout is not None:
            _check_split_names(layout, cfg)
        return datasets.load_dataset("imagefolder", data_dir=path)
    if layout.left_out_images:
        asked = _requested(cfg)
        if asked:
            left = _places(layout.left_out_images, layout.base)
            raise DataError(
                f"data.path={cfg.path!r}: {' and '.join(asked)} cannot be used: {_inference(layout)}; that leaves "
                f"out {left}. For named splits, {SPLIT_LAYOUT}, and pass those "
                f"names; or leave data.train_split and data.val_split unset to load the whole folder as one train "
                f"split with data.val_fraction held out for validation.")
        return _load_as_one_split(path, layout, cfg)
    if not layout.unattached_metadata:  # the captions of a split's images are nowhere in the folder
        split = layout.captionless[0]
        folders = {os.path.dirname(os.path.relpath(f, layout.base)) for f in layout.images_of(split)}
        common = os.path.commonpath(sorted(folders)) if "" not in folders else ""
        target = f"{common}/metadata.jsonl" if common else "a metadata.jsonl beside them"
        raise DataError(
            f"data.path={cfg.path!r}: {_inference(layout)}. It reads a metadata file only for the split whose "
            f"files include it, so split {split} has no captions. Add {target} listing "
            f"its images (file_name relative to that folder), or {SPLIT_LAYOUT}.")
    _check_split_names(layout, cfg)
    return _load_regrouped(path, layout, cfg)


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
        hint = {
            "imagefolder": "it must hold image files plus metadata.jsonl or metadata.csv with a file_name column",
            "disk": "it must be a folder written by datasets' save_to_disk",
            "hub": "hub datasets need network access; where there is none, save the dataset with "
                   "save_to_disk elsewhere and use data.source=disk",
        }[cfg.source]
        raise DataError(f"data.path={cfg.path!r}: could not load it as {cfg.source} ({reason}); {hint}") from None
