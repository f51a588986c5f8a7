"""Atomic file and folder writes: a reader, or a crash at any moment, sees the old or the new
version, never a mix. A leaf module (imports nothing of ours), used by checkpoints, the export,
the run folder and the loggers.

The protocol is the usual one (transformers' ``tmp-checkpoint-*``, torchtitan's step folders):
write into a hidden temporary sibling, fsync it, then ``rename`` it into place, and fsync the
parent folder so the rename itself survives a power cut.
"""

import os
import shutil
from pathlib import Path

TMP_PREFIX = ".tmp-"


def fsync_path(path: Path) -> None:
    """Flush one file or folder entry to disk (a folder: its list of names)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root``, and ``root`` itself."""
    for path in [*sorted(Path(root).rglob("*")), Path(root)]:
        fsync_path(path)


def replace_dir(tmp: Path, final: Path) -> None:
    """Atomically put the folder ``tmp`` at ``final``. An existing ``final`` is renamed aside
    (``.NAME.old``) and removed only after the swap, so a crash leaves one of the two complete."""
    fsync_tree(tmp)
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    fsync_path(final.parent)


def write_atomic(path: Path, text: str) -> None:
    """Replace a small text file so that a reader (or a crash) sees the old or the new one."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
