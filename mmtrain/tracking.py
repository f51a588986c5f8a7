"""The only module that knows W&B. Main process only; every record also goes to metrics.jsonl.

The rank decision is made once, when the tracker is built: non-main ranks get a ``NullTracker``
and the training loop never branches on rank to log. W&B problems (no network, no credentials,
a failing ``log``) degrade to offline or disabled with one warning; ``metrics.jsonl`` is always
written, so no run is ever lost to an outage.
"""

import contextlib
import json
import math
import netrc
import os
import re
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
from PIL import Image as PILImage

from mmtrain.config import WandbConfig
from mmtrain.errors import shell_word


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
    """The mode mmtrain asks ``wandb.init`` for (as ``mode=``, which wandb ranks above ``WANDB_MODE``).

    An explicit ``wandb.mode`` (online, offline, disabled) wins over ``WANDB_MODE``. Under ``auto``,
    ``WANDB_MODE`` wins when it names a W&B mode (``online``/``run``, ``offline``/``dryrun``,
    ``disabled``); otherwise auto is online with credentials and offline without. Online without
    credentials, whichever way it was asked for, logs offline with a warning: wandb would prompt for
    a login on a terminal, and a job must never wait on one.
    """
    asked = f"wandb.mode={requested}"
    if requested == "auto":
        env = os.environ.get("WANDB_MODE", "").strip()
        env_modes = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
                     "disabled": "disabled"}
        if env in env_modes:
            requested, asked = env_modes[env], f"WANDB_MODE={env}"
        else:
            if env:
                warnings.warn(f"W&B: WANDB_MODE={env!r} is not online, offline or disabled; ignoring it "
                              "(wandb.mode=auto).", stacklevel=2)
            return "online" if has_wandb_credentials() else "offline"
    if requested == "online" and not has_wandb_credentials():
        warnings.warn(f"{asked} but no W&B credentials were found (WANDB_API_KEY or `wandb login`); "
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


class _NoAnswer(Exception):
    """A W&B call did not return within its time bound."""


def _call_bounded(fn: Callable[[], Any], timeout: float, name: str,
                  on_late: Callable[[Any], None] | None = None) -> Any:
    """``fn()`` in a daemon thread, waiting at most ``timeout`` seconds for it.

    Returns its result or raises its exception; raises :class:`_NoAnswer` when it has not returned
    in time. The thread is a daemon, so a call stuck for good never keeps the process alive. If it
    returns after we gave up, ``on_late(result)`` runs in that thread: the caller's last word on a
    result nobody is waiting for any more (a late ``wandb.init`` must not leave a run attached).
    """
    lock, outcome = threading.Lock(), {}

    def target() -> None:
        try:
            result, error = fn(), None
        except BaseException as e:  # SystemExit included: it must not escape as if it were ours
            result, error = None, e
        with lock:
            outcome.update(result=result, error=error)
            late = outcome.get("abandoned", False)
        if late and error is None and on_late is not None:
            on_late(result)

    thread = threading.Thread(target=target, name=f"mmtrain-{name}", daemon=True)
    thread.start()
    thread.join(timeout)
    with lock:  # "too late" is decided under the lock: a result arriving now is either used or given to on_late
        if "error" not in outcome:
            outcome["abandoned"] = True
            raise _NoAnswer(f"no answer after {timeout:g} s")
    error = outcome["error"]
    if error is not None:
        raise error if isinstance(error, Exception) else RuntimeError(_describe(error))
    return outcome["result"]


def _describe(error: BaseException) -> str:
    """An exception on one line: wandb's messages span several, and a warning is one line to the user."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _finish_quietly(run: Any) -> None:
    """Close a run we no longer use. Its failure was already reported; this one would say nothing new."""
    if run is not None:
        with contextlib.suppress(Exception):
            run.finish()


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

    def flush(self) -> None:
        pass

    def finish(self) -> None:
        pass


class Tracker(NullTracker):
    """W&B run + ``metrics.jsonl`` for the main process.

    Records logged at the same step (a training window and an evaluation that ends the same
    optimizer step) are merged into one line, as W&B merges them into one history row.

    W&B failures never stop training: the first failing call (init, log, define_metric, summary,
    finish) gives one warning and W&B is off from then on; ``metrics.jsonl`` is written regardless.
    """

    # Our own bound on wandb.init is init_timeout plus this: wandb's init_timeout covers its talk
    # with the server, not the local start-up before it (spawning wandb-core takes seconds on a busy host).
    init_grace_s = 5.0
    # An online finish uploads what is left. Everything is already on disk in the run folder, so past
    # this we stop waiting (`wandb sync` uploads it later) rather than hang the end of the job.
    finish_timeout_s = 120.0
    _dropped_run = None  # a run switched off after a failing call; finish() closes it, quietly

    def __init__(self, output_dir: Path, cfg: WandbConfig, run_config: dict[str, Any],
                 run_id: str | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.jsonl_path = self.output_dir / "metrics.jsonl"
        self._pending: tuple[int, dict[str, Any]] | None = None
        self._written_step = -1  # the step of the last line in metrics.jsonl
        self._run = None
        self.mode = resolve_mode(cfg.mode)
        if self.mode != "disabled":
            self._run = self._init_wandb(cfg, run_config, run_id)
        self.run_dir = Path(self._run.dir).parent if self._run is not None else None
        self.run_id = self._run.id if self._run is not None else None
        self.url = getattr(self._run, "url", None) if self.mode == "online" else None

    def _init_wandb(self, cfg: WandbConfig, run_config: dict[str, Any], run_id: str | None):  # -> wandb Run | None
        """A W&B run in ``self.mode``, else offline, else ``None`` (disabled); one warning if not as asked."""
        import wandb

        def start(mode: str):
            return wandb.init(
                project=cfg.project, entity=cfg.entity, name=cfg.name, tags=cfg.tags or None,
                config=run_config, dir=str(self.output_dir), mode=mode, id=run_id,
                resume="allow" if run_id else None,
                settings=wandb.Settings(init_timeout=cfg.init_timeout, silent=True, console="off"),
            )

        timeout = cfg.init_timeout + self.init_grace_s
        failures = []
        for mode in dict.fromkeys([self.mode, "offline"]):
            try:
                # A hang inside wandb.init (DNS, a proxy, a wedged wandb-core) must not stall the job,
                # and wandb's own init_timeout does not cover every wait; so we bound it ourselves.
                # A late return is finished at once: an active run would otherwise be handed back by
                # the next wandb.init in this process (wandb's reinit="return_previous" default).
                run = _call_bounded(lambda mode=mode: start(mode), timeout, "wandb-init", on_late=_finish_quietly)
            except _NoAnswer as e:
                # No second attempt: the stuck init still holds wandb's process-wide state (its
                # singleton setup, the service connection, the active-run slot), and a second
                # wandb.init would wait on the same state or race it. Disabled is the safe answer.
                failures.append(f"{mode}: {e}")
                break
            except Exception as e:  # network, auth, server timeout: offline needs none of them
                failures.append(f"{mode}: {_describe(e)}")
                continue
            if failures:
                warnings.warn(f"W&B init failed ({'; '.join(failures)}); logging {mode} instead. "
                              "Upload later with `wandb sync`.", stacklevel=3)
            self.mode = mode
            return run
        warnings.warn(f"W&B init failed ({'; '.join(failures)}); W&B is disabled for this run, "
                      "metrics.jsonl has every record.", stacklevel=3)
        self.mode = "disabled"
        return None

    def _drop_wandb(self, what: str, error: Exception) -> None:
        """The first failing W&B call switches W&B off for the rest of the run, with one warning: a run
        that failed once is not trusted with more calls, and one line beats one per step."""
        kept = f"; what it logged so far is in {self.run_dir}" if self.run_dir is not None else ""
        warnings.warn(f"W&B {what} failed ({_describe(error)}); W&B is off for the rest of this "
                      f"run{kept}. metrics.jsonl has every record.", stacklevel=3)
        self._dropped_run, self._run = self._run, None
        self.mode, self.run_dir, self.url = "disabled", None, None

    def define_epoch_metrics(self, keys: list[str]) -> None:
        """Chart these keys (globs allowed) against ``epoch`` instead of the optimizer step."""
        if self._run is not None:
            try:
                self._run.define_metric("epoch")
                for key in keys:
                    self._run.define_metric(key, step_metric="epoch")
            except Exception as e:
                self._drop_wandb("define_metric", e)

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
        """Record ``record`` at optimizer ``step``. Steps must not decrease, and a step whose line was
        flushed is closed: W&B silently drops a record for an earlier step, and metrics.jsonl would
        get its lines out of order. Raises RuntimeError on such a record (a bug in the caller's order)."""
        last = self._pending[0] if self._pending is not None else self._written_step
        if step < last or (self._pending is None and step == last):
            raise RuntimeError(f"record for step {step} after step {last} was logged: the caller must read out "
                               f"late events before logging a later step (keys: {', '.join(sorted(record))})")
        files = {k: self._save_media(k, v, step) for k, v in record.items() if isinstance(v, (Image, Table))}
        line = {**record, **files}
        if self._pending is not None and self._pending[0] == step:
            self._pending[1].update(line)
        else:
            self._flush()
            self._pending = (step, line)
        if self._run is not None:
            # Not bounded by a thread: run.log only hands the record to wandb's local service process,
            # so it fails fast rather than hangs, and a thread per step would cost more than it guards.
            try:
                self._run.log(self._to_wandb(record, files) if files else record, step=step)
            except Exception as e:
                self._drop_wandb("log", e)

    def flush(self) -> None:
        """Write the pending line and make metrics.jsonl durable (before a checkpoint is committed,
        so that a checkpoint never refers to steps whose lines could still be lost). No record for
        the flushed step may follow: it would become a second line for that step."""
        self._flush()
        if self.jsonl_path.exists():
            with self.jsonl_path.open("a") as f:
                os.fsync(f.fileno())

    def _flush(self) -> None:
        if self._pending is None:
            return
        step, record = self._pending
        line = {"step": step, **{k: _jsonable(v) for k, v in record.items()}}
        with self.jsonl_path.open("a") as f:
            f.write(json.dumps(line) + "\n")
        self._pending, self._written_step = None, step

    def summary(self, values: dict[str, Any]) -> None:
        if self._run is not None:
            try:
                self._run.summary.update(values)
            except Exception as e:
                self._drop_wandb("summary", e)
        (self.output_dir / "summary.json").write_text(json.dumps({k: _jsonable(v) for k, v in values.items()},
                                                                 indent=2))

    def finish(self) -> None:
        self._flush()
        run, self._run = self._run, None
        if run is not None:
            try:
                _call_bounded(run.finish, self.finish_timeout_s, "wandb-finish")
            except Exception as e:
                where = self.run_dir
                warnings.warn(f"W&B finish failed ({_describe(e)}); the run's files are in {where}, upload them "
                              f"with `wandb sync {shell_word(where)}`. metrics.jsonl has every record.",
                              stacklevel=2)
        # Close a run dropped after a failure (already warned about), so it is complete on disk and no
        # later wandb.init in this process gets it back; bounded too, in case closing it is what hangs.
        dropped, self._dropped_run = self._dropped_run, None
        if dropped is not None:
            with contextlib.suppress(_NoAnswer):
                _call_bounded(lambda: _finish_quietly(dropped), self.finish_timeout_s, "wandb-finish")


def build_tracker(is_main: bool, output_dir: Path, cfg: WandbConfig, run_config: dict[str, Any],
                  run_id: str | None = None) -> NullTracker:
    return Tracker(output_dir, cfg, run_config, run_id) if is_main else NullTracker()
