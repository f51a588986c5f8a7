"""The ``jsonl`` sink: ``metrics.jsonl`` (one line per optimizer step), ``summary.json`` and the media
files under ``media/``. Always present on the main rank, and essential: every record of the run is
here whatever happens to the other sinks, and checkpoints refer to its lines.

Cutting ``metrics.jsonl`` back when a run resumes in its own folder is the run folder's job
(``mmtrain.run_dir.keep_metrics_until``, done before the loggers open), so ``open`` does not touch it.
"""

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from mmtrain.loggers.base import BaseLogger, Image, Table, is_media


def _jsonable(value: Any) -> Any:
    """JSON has no NaN or infinity: NaN becomes null, ±inf the largest finite double (inside lists
    and dicts too: a finding's evidence may hold a NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key)


class JsonlLogger(BaseLogger):
    """``metrics.jsonl`` + ``summary.json`` + ``media/`` in ``output_dir``.

    Records logged at the same step (a training window and an evaluation that end the same
    optimizer step) are merged into one line: the line is written when a later step arrives, or on
    ``flush``/``close``. The step order itself is checked by :class:`~mmtrain.loggers.base.Loggers`.
    """

    name = "jsonl"
    takes_media = True
    essential = True

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = Path(output_dir)
        self.jsonl_path = self.output_dir / "metrics.jsonl"
        self._pending: tuple[int, dict[str, Any]] | None = None

    def open(self, run_config: dict[str, Any], resume_step: int | None) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)

    def _save_media(self, key: str, value: Image | Table, step: int, index: int | None = None) -> dict[str, Any]:
        """Write an Image as PNG (a Table as JSON with its images as PNGs) under media/; return the
        reference that metrics.jsonl holds in its place."""
        folder = self.output_dir / "media" / _slug(key.removeprefix("media/"))
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"step_{step:08d}" + (f"_{index:03d}" if index is not None else "")
        if isinstance(value, Image):
            path = folder / f"{stem}.png"
            path.write_bytes(value.png())
            return {"_type": "image-file", "path": str(path.relative_to(self.output_dir)), "caption": value.caption}
        rows = [[self._save_media(f"{key}/images", c, step, i * len(value.columns) + j) if isinstance(c, Image)
                 else c for j, c in enumerate(row)] for i, row in enumerate(value.rows)]
        path = folder / f"{stem}.table.json"
        path.write_text(json.dumps({"columns": value.columns, "data": rows}))
        return {"_type": "table-file", "path": str(path.relative_to(self.output_dir)), "nrows": len(rows)}

    def log(self, record: dict[str, Any], step: int) -> None:
        line = {k: self._save_media(k, v, step) if is_media(v) else v for k, v in record.items()}
        if self._pending is not None and self._pending[0] == step:
            self._pending[1].update(line)
        else:
            self._write_pending()
            self._pending = (step, line)

    def _write_pending(self) -> None:
        if self._pending is None:
            return
        step, record = self._pending
        line = {"step": step, **{k: _jsonable(v) for k, v in record.items()}}
        with self.jsonl_path.open("a") as f:
            f.write(json.dumps(line) + "\n")
        self._pending = None

    def flush(self) -> None:
        """Write the pending line and make metrics.jsonl durable (before a checkpoint is committed,
        so that a checkpoint never refers to steps whose lines could still be lost)."""
        self._write_pending()
        if self.jsonl_path.exists():
            with self.jsonl_path.open("a") as f:
                os.fsync(f.fileno())

    def summary(self, values: dict[str, Any]) -> None:
        (self.output_dir / "summary.json").write_text(json.dumps({k: _jsonable(v) for k, v in values.items()},
                                                                 indent=2))

    def close(self) -> None:
        self.flush()
