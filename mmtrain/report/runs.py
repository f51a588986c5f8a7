"""Finding and reading run folders for ``mmtrain report``.

A run folder is what ``mmtrain train`` writes: ``config.yaml``, ``metrics.jsonl`` (one JSON object
per logged optimizer step, complete across resumes), ``summary.json`` once the run has ended, and
``media/``. A run still in progress is read as it is: no summary yet, and a last line that may be
cut off mid-write (skipped).

Reading is the expensive part of a report (a 100-run sweep of 10,000 logged steps is ~3 GB of JSON),
so each run is read in one pass by :func:`load_run`, in worker processes when there is enough to
read, and that pass also writes the run's rows of ``history.csv`` and runs the diagnostics (both
need the parsed lines, which are too big to send back to the parent).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mmtrain.diagnostics import diagnose_columns
from mmtrain.errors import UserError
from mmtrain.report.histories import columns_of, drawn_series, history_rows, parse_lines

METRICS = "metrics.jsonl"
SEED_KEY = "train.seed"

# Config fields that say where and how a run was recorded, not what was trained: they never make two
# runs "different configs" (a sweep's trials all differ in output_dir and wandb.name).
BOOKKEEPING_PREFIXES = ("wandb.", "log.", "checkpoint.", "diagnostics.")
BOOKKEEPING_FIELDS = frozenset({
    "train.output_dir", "train.resume", "train.overwrite", "train.progress_bar", "train.requeue",
    "train.eval_batch_size",  # validation values do not depend on it (README)
    "data.cache_dir", "data.num_workers", "data.decode_cache",  # where the data is cached / how it is loaded
})

# Past this much metrics.jsonl the runs are read in parallel worker processes (below it, starting
# them costs more than it saves).
PARALLEL_BYTES = 16 * 2**20


@dataclass
class RunData:
    """One run as the report uses it. ``series`` holds the metrics the charts draw as
    ``(steps int64, values float32)`` (float32 halves what workers send back; it is only drawn);
    ``last`` holds the last logged value of every numeric metric at full precision."""

    name: str
    path: Path
    config: dict[str, Any]
    flat: dict[str, Any]
    summary: dict[str, Any]
    status: str  # "finished", "in progress", or the summary's own status (e.g. "preempted")
    n_records: int = 0
    last_step: int = 0
    skipped_lines: int = 0
    series: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    media: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # key -> [(step, path in run folder)]
    findings: list[dict[str, Any]] = field(default_factory=list)
    findings_source: str = "diagnose_run"  # or "summary.json" (diagnostics module unavailable) or "none"
    diagnostics_error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds spent in this run's read, by phase

    @property
    def final_val_loss(self) -> float | None:
        """The run's final validation total loss: summary.json's, else the last logged ``val/total_loss``
        (a run in progress), else None (no validation yet)."""
        value = self.summary.get("final_validation_loss")
        if value is None:
            value = self.last.get("val/total_loss")
        return _finite(value)

    @property
    def final_train_loss(self) -> float | None:
        value = self.summary.get("final_train_loss")
        return _finite(self.last.get("total_loss") if value is None else value)


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


# ----------------------------------------------------------------------------------------------- finding runs

def _is_run(folder: Path) -> bool:
    return (folder / METRICS).is_file()


def find_runs(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The run folders named by ``paths``: a folder holding ``metrics.jsonl`` is a run; any other
    folder is searched for runs one and two levels down (a sweep folder of ``trial-NNN`` runs, or a
    folder of sweeps). A ``metrics.jsonl`` file stands for its folder. Order: as given, then by name.

    Raises UserError (one line naming the path and what to give instead) for a path that does not
    exist or holds no run."""
    found: list[Path] = []
    for given in paths:
        path = Path(given).expanduser()
        if not path.exists():
            raise UserError(f"{str(given)!r}: no such file or folder; give run folders (holding {METRICS}) "
                            "or sweep folders holding run folders")
        if path.is_file():
            if path.name != METRICS:
                raise UserError(f"{str(given)!r} is a file; give a run folder (holding {METRICS}) or a sweep folder")
            path = path.parent
        if _is_run(path):
            found.append(path)
            continue
        runs: list[Path] = []
        for child in _subfolders(path):
            if _is_run(child):
                runs.append(child)
            else:
                runs.extend(grandchild for grandchild in _subfolders(child) if _is_run(grandchild))
        if not runs:
            raise UserError(f"{str(given)!r} holds no runs: no {METRICS} in it or in its subfolders 2 levels down; "
                            "give a folder written by 'mmtrain train' (its --train.output_dir) or 'mmtrain sweep'")
        found.extend(runs)
    unique: dict[Path, Path] = {}
    for run in found:
        unique.setdefault(run.resolve(), run)
    return list(unique.values())


def _subfolders(folder: Path) -> list[Path]:
    try:
        children = sorted(folder.iterdir())
    except OSError as e:
        raise UserError(f"{str(folder)!r}: cannot list this folder ({e.strerror or e}); "
                        "check its permissions") from None
    # A run's own subfolders (checkpoints, model, wandb, media...) never hold runs; hidden ones are tools'.
    return [c for c in children if c.is_dir() and not c.name.startswith(".")]


def run_names(paths: Sequence[Path]) -> list[str]:
    """Short unique names: the folder name, with as many parent folders as needed to tell runs apart
    (``trial-003``; ``a/trial-000`` and ``b/trial-000``). When two names clash, every run of the
    folders involved gets the longer name, so the runs of one sweep are named alike."""
    parts = [p.resolve().parts for p in paths]
    depth = [1] * len(paths)
    while True:
        names = ["/".join(parts[i][-depth[i]:]) for i in range(len(paths))]
        clashes = {i for i, n in enumerate(names) if names.count(n) > 1 and depth[i] < len(parts[i])}
        if not clashes:
            return names
        folders = {parts[i][:len(parts[i]) - depth[i]] for i in clashes}
        for i in range(len(paths)):
            if parts[i][:len(parts[i]) - depth[i]] in folders and depth[i] < len(parts[i]):
                depth[i] += 1


# ----------------------------------------------------------------------------------------------- config

def flatten_config(config: dict[str, Any]) -> dict[str, Any]:
    """``{"optim": {"lr": 1e-3}}`` -> ``{"optim.lr": 1e-3}`` (lists become tuples, so values compare and hash)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = tuple(value) if isinstance(value, list) else value

    walk("", config)
    return flat


def is_bookkeeping(key: str) -> bool:
    """True for config fields that do not change what is trained (see BOOKKEEPING_*)."""
    return key in BOOKKEEPING_FIELDS or key.startswith(BOOKKEEPING_PREFIXES)


def varying_params(flats: Sequence[dict[str, Any]], include_seed: bool = False) -> list[str]:
    """Config fields (dotted names) whose value differs between the runs, bookkeeping left out, and
    ``train.seed`` left out unless ``include_seed`` (seeds are the spread, not a parameter). A field
    missing from some runs (an older config) counts as varying."""
    keys = sorted({k for flat in flats for k in flat})
    out = []
    for key in keys:
        if is_bookkeeping(key) or (key == SEED_KEY and not include_seed):
            continue
        values = {_hashable(flat.get(key, MISSING)) for flat in flats}
        if len(values) > 1:
            out.append(key)
    return out


MISSING = "<missing>"


def _hashable(value: Any) -> Any:
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def read_config(run: Path) -> dict[str, Any]:
    """The run's ``config.yaml`` (``Config.to_yaml()``) as a nested dict. Raises UserError naming the
    file and the fix when it is missing or unreadable."""
    path = run / "config.yaml"
    fix = ("copy it back from one of the run's checkpoints (checkpoints/step_*/config.yaml), "
           "or leave this run out of the report")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: missing, so the run's parameters are unknown; {fix}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e}); {fix}") from None
    try:
        config = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise UserError(f"{path}: not valid YAML{at}; {fix}") from None
    if not isinstance(config, dict) or not all(isinstance(v, dict) or v is None for v in config.values()):
        raise UserError(f"{path}: not an mmtrain config (sections of fields); {fix}")
    return {k: (v or {}) for k, v in config.items()}


def read_summary(run: Path) -> dict[str, Any] | None:
    """summary.json, or None for a run that has not written it yet (or is writing it right now)."""
    try:
        summary = json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _diagnose(columns: dict[str, tuple[np.ndarray, np.ndarray]], config: dict[str, Any],
              summary: dict[str, Any] | None) -> tuple[list[dict[str, Any]], str, str | None]:
    """(findings as dicts, where they come from, error text): mmtrain.diagnostics' rules (the same
    functions training runs) on the columns already read here; tests/test_report.py checks they agree
    with ``diagnose_run`` on the parsed lines. A rule that fails on one odd run must not cost the
    whole report: the findings summary.json recorded are shown, with the error on the page."""
    try:
        return [f.to_dict() for f in diagnose_columns(columns, config)], "diagnose_run", None
    except Exception as e:
        recorded = [f for f in (summary or {}).get("findings") or [] if isinstance(f, dict)]
        return recorded, ("summary.json" if recorded else "none"), f"{type(e).__name__}: {e}"


def load_run(path: Path, name: str, keep: Callable[[str], bool], history: Path | None = None,
             diagnose: bool = True) -> RunData:
    """Read one run folder: config, summary, the metrics (series to draw where ``keep(name)``, the last
    value of every metric, media references), its findings, and, if ``history`` is given, append its
    history.csv rows to it. Raises UserError for a missing or unreadable config.yaml or metrics.jsonl."""
    t0 = time.perf_counter()
    config = read_config(path)
    summary = read_summary(path)
    try:
        text = (path / METRICS).read_text(errors="replace")
    except OSError as e:
        raise UserError(f"{path / METRICS}: cannot be read ({e.strerror or e}); check its permissions") from None
    records, lines, skipped = parse_lines(text)
    del text
    t1 = time.perf_counter()
    columns, media, plain, nulls = columns_of(records)
    t2 = time.perf_counter()
    if history is not None:
        append_text(history, history_rows(name, records, lines, plain.tolist(), nulls))
    del lines
    t3 = time.perf_counter()
    findings, source, error = _diagnose(columns, config, summary) if diagnose else ([], "none", None)
    t4 = time.perf_counter()
    status = "in progress" if summary is None else str(summary.get("status") or "finished")
    last = {k: float(v[-1]) for k, (_, v) in columns.items() if len(v)}
    return RunData(
        name=name, path=path, config=config, flat=flatten_config(config), summary=summary or {}, status=status,
        n_records=len(records), last_step=int(records[-1]["step"]) if records else 0, skipped_lines=skipped,
        series=drawn_series(columns, keep), last=last, media=media, findings=findings, findings_source=source,
        diagnostics_error=error,
        timings={"parse": t1 - t0, "columns": t2 - t1, "csv": t3 - t2, "diagnostics": t4 - t3})


# Set in each worker process: serialises the workers' appends to history.csv, so each run's rows stay together.
_CSV_LOCK: Any = None


def _set_lock(lock: Any) -> None:
    global _CSV_LOCK
    _CSV_LOCK = lock


def append_text(path: Path, text: str) -> None:
    """Append ``text`` to ``path`` in one piece (under the workers' lock, when there are workers)."""
    data = text.encode()
    if _CSV_LOCK is None:
        with path.open("ab") as f:
            f.write(data)
        return
    with _CSV_LOCK, path.open("ab") as f:
        f.write(data)


def _load_one(args: tuple[Path, str, Callable[[str], bool], Path | None]) -> RunData:
    return load_run(*args)


def load_runs(paths: Sequence[Path], keep: Callable[[str], bool], history: Path | None = None,
              history_header: str = "", workers: int | None = None) -> list[RunData]:
    """Read every run (see load_run), in parallel processes when there is enough to read; returns the
    runs in the order given. With ``history``, every run's history.csv rows are written there after
    ``history_header``, one run after another (in the order they are read), through a temporary
    file renamed into place at the end, so the file is complete or absent."""
    names = run_names(paths)
    tmp = history.with_name(f".{history.name}.tmp") if history else None
    if tmp is not None:
        tmp.write_text(history_header)
    jobs = [(p, n, keep, tmp) for p, n in zip(paths, names, strict=True)]
    size = sum(_size(p / METRICS) for p in paths)
    workers = workers if workers is not None else min(len(paths), os.cpu_count() or 1)
    try:
        if workers > 1 and size > PARALLEL_BYTES:
            import multiprocessing

            # fork: workers start at once with everything imported (spawn would import mmtrain, numpy and
            # the diagnostics again in each). Nothing here holds threads yet.
            ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
            lock = ctx.Lock()
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_set_lock,
                                     initargs=(lock,)) as pool:
                runs = list(pool.map(_load_one, jobs))
        else:
            runs = [_load_one(job) for job in jobs]
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    if tmp is not None and history is not None:
        os.replace(tmp, history)
    return runs


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
