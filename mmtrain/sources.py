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
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache
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
    """What ``datasets`` would make of an image folder, beside what the folder holds. Paths are
    absolute and normalised, as ``datasets`` resolves them, so the two can be compared."""

    base: str
    images: frozenset[str]  # every file datasets' ImageFolder reads as an image
    metadata: frozenset[str]  # every metadata.csv / metadata.jsonl / metadata.parquet
    splits: dict[str, tuple[str, ...]]  # each split datasets infers -> its files, in datasets' order
    patterns: dict[str, tuple[str, ...]] = field(default_factory=dict)  # each split's datasets patterns
    _decided: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # trigger's memo

    def images_of(self, split: str, owned: bool = False) -> list[str]:
        """The image files datasets puts in ``split``; with ``owned``, only those no earlier split has:
        a file under two split words (train/test_shots/x.png) is counted once, in the first."""
        return [f for f in self.splits[split] if f in self.images and (not owned or self.owner[f] == split)]

    def metadata_of(self, split: str) -> list[str]:
        """The metadata files ``split`` reads: only those among its own files."""
        return [f for f in self.splits[split] if f in self.metadata]

    @cached_property
    def owner(self) -> dict[str, str]:
        """Each file in a split -> the first split, in datasets' order, that has it."""
        return {f: s for s, files in reversed(self.splits.items()) for f in files}

    @property
    def left_out_images(self) -> list[str]:  # in no inferred split: datasets would drop them without a word
        return sorted(self.images.difference(self.owner))

    @property
    def unattached_metadata(self) -> list[str]:  # in no inferred split: datasets reads none of their rows
        return sorted(self.metadata.difference(self.owner))

    @property
    def captionless(self) -> list[str]:
        """Splits with images but no metadata file of their own, in a folder that has metadata: datasets
        would give them no caption column (or, beside a split that has metadata, no rows at all)."""
        if not self.metadata:
            return []  # a folder without any metadata has no captions anywhere; data.py names the column
        return [s for s in self.splits if self.images_of(s) and not self.metadata_of(s)]

    @property
    def consistent(self) -> bool:  # loading the folder as datasets infers it keeps every image and caption
        return not self.left_out_images and not self.captionless

    def trigger(self, split: str, file: str) -> str:
        """The name(s) in ``file``'s path that put it in ``split`` ('photos/testing.png', 'test_prints/'),
        asked of the split's own patterns: the fewest, deepest first, whose renaming takes it out (the
        folder above, 'photos/', would change nothing). '' where no renaming does (datasets' "**")."""
        # A folder's name decided it for one file: it does for all in that folder (datasets' folder
        # patterns end in /**), so a big folder costs one search.
        key = (split, os.path.dirname(file))
        if key in self._decided:
            return self._decided[key]
        parts = os.path.relpath(file, self.base).split(os.sep)
        regexes = [r for p in self.patterns.get(split, ()) if (r := _glob(self.base, p))]

        def hit(neutral: set[int]) -> bool:  # 'x' carries no split word; a file keeps its extension
            names = [("x" + os.path.splitext(p)[1] * (i == len(parts) - 1)) if i in neutral else p
                     for i, p in enumerate(parts)]
            return any(r.match("/".join([self.base, *names])) for r in regexes)

        if not hit(set()):
            return "/".join(parts)  # no patterns to ask (datasets' own resolution found it): the file
        neutral: set[int] = set()
        for i in reversed(range(len(parts))):  # rename names, deepest first, until the file is out
            neutral.add(i)
            if not hit(neutral):
                break
        for i in sorted(neutral, reverse=True):  # then keep only the renamings that matter
            if not hit(neutral - {i}):
                neutral.discard(i)
        names = " and ".join("/".join(parts[:i + 1]) + "/" * (i < len(parts) - 1) for i in sorted(neutral))
        if len(parts) - 1 not in neutral:
            self._decided[key] = names
        return names


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
    patterns, splits = _splits_from_listing(base, every) or ({}, {})
    layout = FolderSplits(
        base=base,
        images=frozenset(norm(f) for f in every if os.path.splitext(f)[1].lower() in ImageFolder.EXTENSIONS),
        metadata=frozenset(norm(f) for f in every if os.path.basename(f) in ImageFolder.METADATA_FILENAMES),
        splits=splits, patterns=patterns)
    if layout.splits and layout.consistent:
        return layout
    # datasets' own way walks the whole folder once per pattern (seconds per 10k files, the cost
    # its load pays again); worth it only before mmtrain departs from what datasets does.
    try:
        patterns = {str(split): tuple(p) for split, p in get_data_patterns(base).items()}
        inferred = DataFilesDict.from_patterns(patterns, base_path=base)
    except (FileNotFoundError, ValueError):
        return None
    return replace(layout, patterns=patterns,
                   splits={str(name): tuple(norm(f) for f in files) for name, files in inferred.items()})


@lru_cache(maxsize=512)
def _glob(base: str, pattern: str) -> Any:
    """``pattern`` under ``base`` as a regex matching what fsspec's glob does (None without its helper)."""
    try:
        from fsspec.utils import glob_translate
    except ImportError:
        return None
    return re.compile(glob_translate(f"{base}/{pattern}"))


def _splits_from_listing(base: str, files: list[str]) -> tuple[dict, dict] | None:
    """(patterns, files) of each split: datasets' split inference run on one listing of the folder
    instead of one walk per pattern: its own pattern search (``_get_data_files_patterns``) with a
    resolver matching each pattern (``_glob``) against ``files``, already filtered by datasets'
    hidden-file rules. None where either private helper is missing in this datasets/fsspec."""
    try:
        from datasets.data_files import _get_data_files_patterns
    except ImportError:
        return None

    def matching(pattern: str) -> list[str]:
        return [f for f in files if _glob(base, pattern).match(f)]

    def resolver(pattern: str) -> list[str]:
        found = matching(pattern)
        if not found:
            raise FileNotFoundError(pattern)  # what datasets' resolve_pattern raises for no match
        return found

    try:
        patterns = {str(split): tuple(p) for split, p in _get_data_files_patterns(resolver).items()}
    except (FileNotFoundError, ValueError, AttributeError):  # AttributeError: _glob found no glob_translate
        return None
    return patterns, {split: tuple(os.path.normpath(f) for f in dict.fromkeys(f for p in split_patterns
                                                                            for f in matching(p)))
                      for split, split_patterns in patterns.items()}


def _count(n: int, what: str = "image") -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _more(names: list[str]) -> str:
    """The first few names, then how many more: messages stay one readable line for any folder."""
    extra = len(names) - NAMED_PLACES
    return ", ".join(names[:NAMED_PLACES]) + (f" and {extra} more" if extra > 0 else "")


def _places(images: list[str], base: str) -> str:
    """Image files as the user sees them: by folder ('sketches/ (30 images)'), top-level ones by name."""
    rel = sorted(os.path.relpath(f, base) for f in images)
    folders = Counter(os.path.dirname(r) + "/" for r in rel if os.path.dirname(r))
    top = [r for r in rel if not os.path.dirname(r)]
    named = [f"{folder} ({_count(n)})" for folder, n in sorted(folders.items())]
    if top:
        named.append(top[0] if len(top) == 1 else f"{_count(len(top), 'top-level image')} ({_more(top)})")
    return _more(named) if named else "no images"


def _files(paths: list[str], base: str) -> str:
    return _more([os.path.relpath(f, base) for f in sorted(paths)])


def _inference(layout: FolderSplits) -> str:
    """How datasets split this folder, the opening of every message about it: 'test from test_prints/
    (10 images) with no metadata file; ...', each split by the names that carry its split word."""
    from datasets.data_files import SPLIT_KEYWORDS

    parts = []
    for split in layout.splits:
        meta, images = layout.metadata_of(split), layout.images_of(split, owned=True)
        if not layout.images_of(split):  # e.g. a notes file datasets matched by name: name the file itself
            parts.append(f"{split} from {_files(list(layout.splits[split]), layout.base)} (no image files)")
            continue
        names = Counter(layout.trigger(split, f) for f in images)
        named = [_places(images, layout.base)] if "" in names else [
            f"{name} ({_count(n)})" if name.endswith("/") else name for name, n in sorted(names.items())]
        # Files under two split words (train/test_shots/) are counted once, where they went: say which.
        shared = Counter((layout.trigger(split, f), layout.owner[f]) for f in layout.images_of(split)
                         if layout.owner[f] != split)
        named += [f"{name} ({_count(n)}, counted in {owner})" for (name, owner), n in sorted(shared.items())]
        parts.append(f"{split} from {_more(named)} "
                     f"{f'reading {_files(meta, layout.base)}' if meta else 'with no metadata file'}")
    words = ", ".join(word for words in SPLIT_KEYWORDS.values() for word in words)
    return (f"datasets infers an image folder's splits from split words in its folder and file names ({words}); "
            f"here: {'; '.join(parts)}")


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
    raise DataError(f"data.path={cfg.path!r}: {' and '.join(bad)} is not among the splits: {_inference(layout)}. "
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
    _warn(f"data.path={cfg.path!r}: {_count(len(unlisted), 'image file')} of {len(layout.images)} not listed in "
          f"any metadata file, so datasets drops {it} and mmtrain neither trains nor validates on {it}: "
          f"{_files(unlisted, layout.base)}. To use {it}, add a line {'for each ' * (it == 'them')}to "
          f"{_files(sorted(set(meta.values())), layout.base)} with its file_name (relative to that file's folder) "
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
    left = _places(layout.left_out_images, layout.base)
    if layout.unattached_metadata:
        left += f" and {_files(layout.unattached_metadata, layout.base)}"
    names = {s: sorted({layout.trigger(s, f) for f in layout.splits[s]}) for s in layout.splits}
    renamed = {n for s in layout.splits for f in layout.images_of(s) for n in layout.trigger(s, f).split(" and ")}
    metas = [m for m in sorted(layout.metadata) for d in [os.path.dirname(os.path.relpath(m, layout.base))]
             if any(name.rstrip("/") != d and name.startswith(f"{d}/" if d else "") for name in renamed)]
    one = len({n for joined in names.values() for j in joined for n in j.split(" and ")}) == 1
    update = (f", and change {'it' if one else 'them'} to the new {'name' if one else 'names'} in the file_name "
              f"entries of {_files(metas, layout.base)}") if metas else ""
    _warn(f"data.path={cfg.path!r}: {_inference(layout)}; that leaves out {left}. mmtrain loaded the whole folder "
          f"as one train split instead ({_count(raw['train'].num_rows, 'sample')}) and holds out "
          f"data.val_fraction={cfg.val_fraction} of it for validation. For named splits, {SPLIT_LAYOUT} "
          f"(--data.val_split picks the one to validate on); to keep one split without this warning, rename "
          f"{' and '.join(f'{_more(n)} ({s} split)' for s, n in names.items())} to "
          f"{'a name' if one else 'names'} without a split word{update}.")
    return raw


def _load_regrouped(path: str, layout: FolderSplits, cfg: DataConfig) -> Any:
    """Every image is in an inferred split, but a metadata file outside them holds the captions of
    some: keep datasets' splits and give each metadata row to the split its image file is in (the
    first one, for a file under two split words, as _inference says)."""
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
                f"data.path={cfg.path!r}: {_inference(layout)}. No metadata file lists an image of split {split}, "
                f"so it has no captions. List them in {_files(layout.unattached_metadata, layout.base)}, "
                f"or {SPLIT_LAYOUT}.")
    unattached = _files(layout.unattached_metadata, layout.base)
    counts = ", ".join(f"{split} {_count(len(r), 'sample')}" for split, r in rows.items() if r)
    _warn(f"data.path={cfg.path!r}: {_inference(layout)}. It reads a metadata file only for the split whose files "
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
                f"data.path={cfg.path!r}: {' and '.join(asked)} cannot be used: {_inference(layout)}; that leaves "
                f"out {_places(layout.left_out_images, layout.base)}. For named splits, {SPLIT_LAYOUT}, and pass "
                f"those names; or leave data.train_split and data.val_split unset to load the whole folder as one "
                f"train split with data.val_fraction held out for validation.")
        raw = _load_as_one_split(path, layout, cfg)
    elif not layout.unattached_metadata:  # the captions of a split's images are nowhere in the folder
        split = layout.captionless[0]
        folders = {os.path.dirname(os.path.relpath(f, layout.base)) for f in layout.images_of(split)}
        common = os.path.commonpath(sorted(folders)) if "" not in folders else ""
        target = f"{common}/metadata.jsonl" if common else "a metadata.jsonl beside them"
        raise DataError(
            f"data.path={cfg.path!r}: {_inference(layout)}. It reads a metadata file only for the split whose "
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
