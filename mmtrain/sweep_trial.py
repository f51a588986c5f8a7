"""A trial's process for ``mmtrain sweep``: started in a session of its own that dies with the sweep, stopped,
and judged when it ends.

* :func:`die_with_sweep` (Linux): the kernel sends a trial SIGTERM when its sweep dies, however it dies (SIGKILL,
  the OOM killer), by PR_SET_PDEATHSIG. That follows the *thread* that started the trial, so trials are started
  from the thread running the sweep, which lives as long as it. With ``--launcher accelerate`` the SIGTERM reaches
  ``accelerate launch``, which stops its whole tree: SIGTERM to its training processes, SIGKILL to what is left
  5 s later (one process; torchrun's agent, with several, stops its workers likewise).
* :func:`outcome`: "finished" (exit 0 with a run's final summary.json), "interrupted" (stopped by the sweep, or
  saved and exited on a SIGTERM from elsewhere: summary status "preempted") or "failed". A trial killed by a signal
  the sweep did not send (kill -9, the OOM killer) is failed, with ``killed by SIGKILL (returncode -9; out of
  memory?)`` as its error; ``--retry-failed`` continues it from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HEADER = "== mmtrain sweep: "  # the sweep's line in train.log before each attempt


@dataclasses.dataclass
class Running:
    trial: int
    params: dict[str, Any]
    folder: Path
    proc: subprocess.Popen
    log: Any
    started: float
    attempt: int


def metric(folder: Path, name: str) -> tuple[dict[str, Any] | None, float | None]:
    """(summary.json, the metric): the summary's value, else the last logged one in metrics.jsonl (W&B's
    summary of a logged key is its last value); None when absent or not finite."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None, None
    value = summary.get(name)
    if value is None and (folder / "metrics.jsonl").is_file():
        for line in (folder / "metrics.jsonl").read_text().splitlines():
            try:
                value = json.loads(line).get(name, value)
            except (json.JSONDecodeError, AttributeError):
                continue
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return summary, float(value) if ok else None


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def error_line(rc: int, log: Path) -> str:
    """Why a trial failed: the signal that killed it; else its own error line (``mmtrain: error: ...``) or the
    last line this attempt printed (read only when it exited non-zero); else its return code."""
    if rc < 0:  # not sent by the sweep (that is "interrupted"): kill -9, the OOM killer, a crash
        oom = "; out of memory?" if -rc == signal.SIGKILL else ""
        return f"killed by {signal_name(-rc)} (returncode {rc}{oom})"
    if rc == 0:
        return "exited 0 without a finished run's summary.json"
    try:
        with log.open("rb") as f:
            f.seek(max(0, log.stat().st_size - 65536))
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    mine = [i for i, line in enumerate(lines) if line.startswith(HEADER)]
    lines = lines[mine[-1] + 1:] if mine else lines  # this attempt's lines only
    errors = [line for line in lines if "error:" in line]
    if errors or lines:
        return (errors or lines)[-1][-300:]
    return f"exited with returncode {rc}, printing nothing"


def outcome(run: Running, metric_name: str, stopping: bool) -> dict[str, Any]:
    rc = run.proc.returncode
    summary, value = metric(run.folder, metric_name)
    finished = rc == 0 and summary is not None and "status" not in summary  # a stopped run's summary has status
    preempted = rc == 0 and summary is not None and summary.get("status") == "preempted"
    status = "finished" if finished else "interrupted" if stopping or preempted else "failed"
    record = {"trial": run.trial, "params": run.params, "status": status, "metric": value if finished else None,
              "returncode": rc, "output_dir": str(run.folder), "seconds": round(time.monotonic() - run.started, 1),
              "attempt": run.attempt}
    if status == "failed":
        record["error"] = (f"exited 0 with summary.json status {summary['status']!r}" if rc == 0 and summary
                           else error_line(rc, run.folder / "train.log"))
    return record


def signal_trial(run: Running, launcher: str, sig: int) -> None:
    """SIGTERM the training process(es), which save and exit 0; not `accelerate launch` itself, which would give
    them 5 s (one process) before SIGKILL. SIGKILL goes to the trial's whole process group."""
    try:
        if sig == signal.SIGKILL:
            os.killpg(run.proc.pid, sig)
        elif launcher == "accelerate":
            import psutil

            for child in psutil.Process(run.proc.pid).children():
                child.send_signal(sig)
        else:
            run.proc.send_signal(sig)
    except (ProcessLookupError, OSError, ImportError):
        pass  # already gone


def die_with_sweep():  # -> a preexec_fn, or None
    """A trial's preexec_fn on Linux: the kernel sends the trial SIGTERM (save and exit) when the sweep dies, however
    it dies (PR_SET_PDEATHSIG; it fires when the thread that started the trial ends: the sweep's own thread). If the
    sweep died before this took effect, the trial does not start."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # loaded here: the child only calls it
    except (OSError, AttributeError):
        return None
    sweep = os.getpid()

    def preexec() -> None:
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        if os.getppid() != sweep:
            os._exit(1)

    return preexec
