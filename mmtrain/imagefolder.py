"""What ``datasets`` infers from an image folder's names, beside what the folder holds.

``datasets`` infers an image folder's splits from split words (train, test, valid, ...) in its folder and
file names, and each split reads only the metadata files among its own files. :func:`inspect_imagefolder`
asks ``datasets``' own pattern functions (not a copy of its rules) what it would infer, so that
:mod:`mmtrain.sources` can compare it with the files and say what happened in terms of the names that
caused it."""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from mmtrain.images import image_extensions

# How many folders or files a message names before "and N more".
NAMED_PLACES = 4


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
    norm, extensions = os.path.normpath, image_extensions()
    patterns, splits = _splits_from_listing(base, every) or ({}, {})
    layout = FolderSplits(
        base=base,
        images=frozenset(norm(f) for f in every if os.path.splitext(f)[1].lower() in extensions),
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


def count_of(n: int, what: str = "image") -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def and_more(names: list[str]) -> str:
    """The first few names, then how many more: messages stay one readable line for any folder."""
    extra = len(names) - NAMED_PLACES
    return ", ".join(names[:NAMED_PLACES]) + (f" and {extra} more" if extra > 0 else "")


def name_places(images: list[str], base: str) -> str:
    """Image files as the user sees them: by folder ('sketches/ (30 images)'), top-level ones by name."""
    rel = sorted(os.path.relpath(f, base) for f in images)
    folders = Counter(os.path.dirname(r) + "/" for r in rel if os.path.dirname(r))
    top = [r for r in rel if not os.path.dirname(r)]
    named = [f"{folder} ({count_of(n)})" for folder, n in sorted(folders.items())]
    if top:
        named.append(top[0] if len(top) == 1 else f"{count_of(len(top), 'top-level image')} ({and_more(top)})")
    return and_more(named) if named else "no images"


def name_files(paths: list[str], base: str) -> str:
    return and_more([os.path.relpath(f, base) for f in sorted(paths)])


def inference_of(layout: FolderSplits) -> str:
    """How datasets split this folder, the opening of every message about it: 'test from test_prints/
    (10 images) with no metadata file; ...', each split by the names that carry its split word."""
    from datasets.data_files import SPLIT_KEYWORDS

    parts = []
    for split in layout.splits:
        meta, images = layout.metadata_of(split), layout.images_of(split, owned=True)
        if not layout.images_of(split):  # e.g. a notes file datasets matched by name: name the file itself
            parts.append(f"{split} from {name_files(list(layout.splits[split]), layout.base)} (no image files)")
            continue
        names = Counter(layout.trigger(split, f) for f in images)
        named = [name_places(images, layout.base)] if "" in names else [
            f"{name} ({count_of(n)})" if name.endswith("/") else name for name, n in sorted(names.items())]
        # Files under two split words (train/test_shots/) are counted once, where they went: say which.
        shared = Counter((layout.trigger(split, f), layout.owner[f]) for f in layout.images_of(split)
                         if layout.owner[f] != split)
        named += [f"{name} ({count_of(n)}, counted in {owner})" for (name, owner), n in sorted(shared.items())]
        parts.append(f"{split} from {and_more(named)} "
                     f"{f'reading {name_files(meta, layout.base)}' if meta else 'with no metadata file'}")
    words = ", ".join(word for words in SPLIT_KEYWORDS.values() for word in words)
    return (f"datasets infers an image folder's splits from split words in its folder and file names ({words}); "
            f"here: {'; '.join(parts)}")
