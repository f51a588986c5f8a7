"""The sweep folder's bookkeeping for ``mmtrain sweep``: its ledger ``sweep.jsonl``, its lock, and the trials an
earlier sweep may have left running there.

* The ledger is a header line (the spec as parsed, its sha256, the seed, the overrides), then one line per trial
  event, each fsynced; the last line of a trial wins. A line torn by a kill is skipped when read, and the next line
  written starts on a line of its own.
* ``SWEEP_DIR/.lock`` is held (``flock``) for the whole run, so a second sweep on the same folder is refused with the
  pid that holds it. The kernel releases it however the sweep ends.
* A trial's "started" line records its pid (the leader of its own process group) and that process's start time.
  A sweep that dies without recording an outcome (SIGKILL, the OOM killer) leaves that line last: on Linux its trials
  are sent SIGTERM as it dies (mmtrain.sweep), elsewhere, or for a trial that ignores SIGTERM, they may still be
  running. The next sweep on the folder waits up to ``ORPHAN_WAIT`` seconds for them to end, then refuses to start
  a second copy in their folders.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmtrain.errors import UserError

if TYPE_CHECKING:
    from mmtrain.sweep_spec import SweepSpec

LEDGER = "sweep.jsonl"
LOCK = ".lock"
ORPHAN_WAIT = 60.0  # seconds a new sweep waits for the trials of a dead one to save and exit


def append(path: Path, record: dict[str, Any]) -> None:
    """One JSON line, fsynced: a sweep killed at any moment keeps every line written before. After a line torn by
    a kill (no final newline), a newline first, so this line is not glued to the torn one."""
    with path.open("ab+") as f:  # appends, wherever it has read
        torn = False
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        f.write((("\n" if torn else "") + json.dumps(record) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def read_ledger(path: Path) -> tuple[dict[str, Any] | None, dict[int, dict[str, Any]]]:
    """(the header, {trial: its last line}); a line torn by a kill is skipped."""
    header, trials = None, {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict):
                continue
            if "trial" in record:
                trials[record["trial"]] = record
            elif header is None:
                header = record
    return header, trials


def check_ledger(path: Path, spec: SweepSpec, seed: int, overrides: list[str]) -> dict[int, dict[str, Any]]:
    """The trials an earlier command recorded in ``path``; UserError if it ran another spec, seed or overrides."""
    header, trials = read_ledger(path)
    if header is None:
        return trials
    fix = f"use another --out, or delete {path} to start this sweep over"
    if header.get("spec_sha256") != spec.digest:
        raise UserError(f"{path} records another sweep spec ({header.get('spec_file')}, sha256 "
                        f"{str(header.get('spec_sha256'))[:12]}) than {spec.path} (sha256 {spec.digest[:12]}); {fix}")
    if header.get("overrides") != overrides:
        raise UserError(f"{path} was run with the overrides {header.get('overrides')}, not {overrides}; repeat them "
                        f"after -- to continue it, or {fix}")
    if header.get("seed") != seed:
        raise UserError(f"{path} was run with --seed {header.get('seed')}; repeat it to continue, or {fix}")
    return trials


def write_header(path: Path, spec: SweepSpec, seed: int, overrides: list[str]) -> None:
    if read_ledger(path)[0] is None:
        append(path, {"sweep": spec.name, "spec_file": str(spec.path), "spec_sha256": spec.digest, "spec": spec.raw,
                      "method": spec.method, "metric": {"name": spec.metric, "goal": spec.goal}, "seed": seed,
                      "overrides": overrides, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})


@contextlib.contextmanager
def folder_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.lock`` (flock) while the sweep runs; UserError naming the folder and the pid holding it when
    another sweep does. Not inherited by the trials: it is released when the sweep ends, however it ends."""
    import fcntl

    with (out / LOCK).open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            raise UserError(f"{out} is in use by another mmtrain sweep (pid {pid}); wait for it to end or stop it "
                            f"(kill -INT {pid}), or give another --out") from None
        except OSError as e:  # a file system without locks
            print(f"mmtrain: warning: {out / LOCK}: cannot lock it ({e.strerror}); nothing keeps a second sweep "
                  "from running in this folder at the same time", file=sys.stderr, flush=True)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


def started_at(pid: int) -> float | None:
    """The start time of process ``pid`` (recorded with it, so that a pid used again later is not taken for it)."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def still_running(record: dict[str, Any]) -> bool:
    """Whether the trial of a "started" line has processes left: its process group (each trial is started in a
    session of its own) has a member that is not a zombie, and its pid is not another process's now."""
    import psutil

    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 1:
        return False
    try:
        os.killpg(pid, 0)
    except OSError:  # no such group, or another user's: ours is gone
        return False
    try:
        leader = psutil.Process(pid)
        if leader.status() != psutil.STATUS_ZOMBIE:
            created = record.get("pid_created")
            return created is None or abs(leader.create_time() - created) < 1.0
    except psutil.Error:
        pass  # the leader has exited (with accelerate, its training processes may not have)
    for p in psutil.process_iter(["status"]):
        with contextlib.suppress(OSError):
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(p.pid) == pid:
                return True
    return False


def wait_for_orphans(out: Path, trials: dict[int, dict[str, Any]], say: Callable[[str], None]) -> None:
    """Wait up to ORPHAN_WAIT seconds for the trials an earlier sweep left running in ``out`` (its last line of
    them is "started") to end; UserError naming them if they do not."""
    left = {i: r for i, r in trials.items() if r.get("status") == "started" and still_running(r)}
    if not left:
        return
    names = ", ".join(f"trial-{i:03d} (pid {r['pid']})" for i, r in sorted(left.items()))
    say(f"mmtrain: waiting up to {ORPHAN_WAIT:.0f}s for {names}, left running by an earlier sweep, to stop")
    deadline = time.monotonic() + ORPHAN_WAIT
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = {i: r for i, r in left.items() if still_running(r)}
    if left:
        names = ", ".join(f"trial-{i:03d} (pid {r['pid']})" for i, r in sorted(left.items()))
        one = len(left) == 1
        raise UserError(f"{out}: {names}, started by an earlier sweep that ended without stopping "
                        f"{'it, is' if one else 'them, are'} still running; wait for {'it' if one else 'them'} to "
                        f"end or stop {'it' if one else 'them'} (kill -TERM -PID: the whole trial), then run this "
                        "again")
