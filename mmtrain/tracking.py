"""The only module that knows W&B. Main process only; every record also goes to metrics.jsonl.

The rank decision is made once, when the tracker is built: non-main ranks get a ``NullTracker``
and the training loop never branches on rank to log. W&B problems (no network, no credentials,
a failing ``log``) degrade to offline or disabled with one warning; ``metrics.jsonl`` is always
written, so no run is ever lost to an outage.
"""

import json
import math
import netrc
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
from PIL import Image as PILImage

from mmtrain.config import WandbConfig


def has_wandb_credentials() -> bool:
    """True when an API key is configured (env var or ~/.netrc), without contacting any server."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(requested: str) -> str:
    """``auto`` -> online with credentials, else offline. ``online`` without them -> offline, warned."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "online") and requested == "auto":
        return os.environ["WANDB_MODE"]
    if requested == "auto":
        return "online" if has_wandb_credentials() else "offline"
    if requested == "online" and not has_wandb_credentials():
        warnings.warn("wandb.mode=online but no W&B credentials were found (WANDB_API_KEY or `wandb login`); "
                      "logging offline instead. Upload later with `wandb sync`.", stacklevel=2)
        return "offline"
    return requested


@dataclass
class Image:
    """An image to log: (H, W) or (H, W, 3) uint8."""

    array: np.ndarray
    caption: str | None = None


@dataclass
class Table:
    """A table to log; cells may be :class:`Image`, str or numbers."""

    columns: list[str]
    rows: list[list[Any]]


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    return value


def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key)


class NullTracker:
    """What every non-main rank holds: accepts everything, does nothing."""

    mode = "disabled"
    run_dir: Path | None = None
    run_id: str | None = None
    url: str | None = None

    def log(self, record: dict[str, Any], step: int) -> None:
        pass

    def define_epoch_metrics(self, keys: list[str]) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class Tracker(NullTracker):
    """W&B run + ``metrics.jsonl`` for the main process.

    Records logged at the same step (a training window and an evaluation that ends the same
    optimizer step) are merged into one line, as W&B merges them into one history row.
    """

    def __init__(self, output_dir: Path, cfg: WandbConfig, run_config: dict[str, Any],
                 run_id: str | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.jsonl_path = self.output_dir / "metrics.jsonl"
        self._pending: tuple[int, dict[str, Any]] | None = None
        self._run = None
        self.mode = resolve_mode(cfg.mode)
        if self.mode != "disabled":
            self._run = self._init_wandb(cfg, run_config, run_id)
        self.run_dir = Path(self._run.dir).parent if self._run is not None else None
        self.run_id = self._run.id if self._run is not None else None
        self.url = getattr(self._run, "url", None) if self.mode == "online" else None

    def _init_wandb(self, cfg: WandbConfig, run_config: dict[str, Any], run_id: str | None):  # -> wandb Run | None
        import wandb

        for mode in dict.fromkeys([self.mode, "offline"]):
            try:
                run = wandb.init(
                    project=cfg.project, entity=cfg.entity, name=cfg.name, tags=cfg.tags or None,
                    config=run_config, dir=str(self.output_dir), mode=mode, id=run_id,
                    resume="allow" if run_id else None,
                    settings=wandb.Settings(init_timeout=cfg.init_timeout, silent=True, console="off"),
                )
                self.mode = mode
                return run
            except Exception as e:  # network, auth, timeout: the run must go on without W&B
                warnings.warn(f"W&B init in {mode} mode failed ({type(e).__name__}: {e}); "
                              f"{'trying offline' if mode == 'online' else 'W&B disabled, metrics.jsonl only'}.",
                              stacklevel=2)
        self.mode = "disabled"
        return None

    def define_epoch_metrics(self, keys: list[str]) -> None:
        """Chart these keys (globs allowed) against ``epoch`` instead of the optimizer step."""
        if self._run is not None:
            self._run.define_metric("epoch")
            for key in keys:
                self._run.define_metric(key, step_metric="epoch")

    def _save_media(self, key: str, value: Any, step: int, index: int | None = None) -> dict[str, Any]:
        """Write an Image as PNG (a Table as JSON with its images as PNGs) under media/; return the
        reference that metrics.jsonl holds in its place."""
        folder = self.output_dir / "media" / _slug(key.removeprefix("media/"))
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"step_{step:08d}" + (f"_{index:03d}" if index is not None else "")
        if isinstance(value, Image):
            path = folder / f"{stem}.png"
            PILImage.fromarray(value.array).save(path)
            return {"_type": "image-file", "path": str(path.relative_to(self.output_dir)), "caption": value.caption}
        rows = [[self._save_media(f"{key}/images", c, step, i * len(value.columns) + j) if isinstance(c, Image)
                 else c for j, c in enumerate(row)] for i, row in enumerate(value.rows)]
        path = folder / f"{stem}.table.json"
        path.write_text(json.dumps({"columns": value.columns, "data": rows}))
        return {"_type": "table-file", "path": str(path.relative_to(self.output_dir)), "nrows": len(rows)}

    def _to_wandb(self, record: dict[str, Any], files: dict[str, dict[str, Any]]) -> dict[str, Any]:
        import wandb

        def convert(value: Any) -> Any:
            if isinstance(value, Image):
                return wandb.Image(value.array, caption=value.caption)
            if isinstance(value, Table):
                return wandb.Table(columns=value.columns, data=[[convert(c) for c in row] for row in value.rows])
            return value

        def top_level(key: str, value: Any) -> Any:
            if isinstance(value, Image):  # hand W&B the PNG already written: no second encoding
                return wandb.Image(str(self.output_dir / files[key]["path"]), caption=value.caption)
            return convert(value)

        return {k: top_level(k, v) for k, v in record.items()}

    def log(self, record: dict[str, Any], step: int) -> None:
        files = {k: self._save_media(k, v, step) for k, v in record.items() if isinstance(v, (Image, Table))}
        line = {**record, **files}
        if self._pending is not None and self._pending[0] == step:
            self._pending[1].update(line)
        else:
            self._flush()
            self._pending = (step, line)
        if self._run is not None:
            try:
                self._run.log(self._to_wandb(record, files) if files else record, step=step)
            except Exception as e:
                warnings.warn(f"W&B log failed ({type(e).__name__}: {e}); continuing with metrics.jsonl only.",
                              stacklevel=2)
                self._run = None

    def _flush(self) -> None:
        if self._pending is None:
            return
        step, record = self._pending
        line = {"step": step, **{k: _jsonable(v) for k, v in record.items()}}
        with self.jsonl_path.open("a") as f:
            f.write(json.dumps(line) + "\n")
        self._pending = None

    def summary(self, values: dict[str, Any]) -> None:
        if self._run is not None:
            self._run.summary.update(values)
        (self.output_dir / "summary.json").write_text(json.dumps({k: _jsonable(v) for k, v in values.items()},
                                                                 indent=2))

    def finish(self) -> None:
        self._flush()
        if self._run is not None:
            self._run.finish()
            self._run = None


def build_tracker(is_main: bool, output_dir: Path, cfg: WandbConfig, run_config: dict[str, Any],
                  run_id: str | None = None) -> NullTracker:
    return Tracker(output_dir, cfg, run_config, run_id) if is_main else NullTracker()
