"""``mmtrain sweep SWEEP.yaml``: run a W&B-format sweep locally, one ``mmtrain train`` subprocess per trial.

The YAML is the one ``wandb sweep`` takes (mmtrain.sweep_spec reads it). Each trial runs the YAML's
``command``, expanded as ``wandb agent`` would, plus ``--train.output_dir=SWEEP_DIR/trial-NNN``,
``--wandb.group=<sweep name>`` and the overrides given after ``--``, with its output in
``trial-NNN/train.log``. ``SWEEP_DIR/sweep.jsonl`` is the ledger (mmtrain.sweep_ledger): a header line, then one
line per trial event; the last line of a trial wins. Exit status: 0 when every trial finished, 1 otherwise, 2 for
bad input (a second sweep on a folder in use included).

Stopping and continuing:

* Ctrl-C, SIGTERM or SIGHUP (a closed terminal, an ssh disconnect; not under nohup) asks every running trial to
  save a checkpoint and exit (SIGTERM to its training processes); a second Ctrl-C kills them. They are recorded
  "interrupted".
* If the sweep dies without doing that (SIGKILL, the OOM killer), the kernel sends each trial SIGTERM (Linux;
  mmtrain.sweep_trial). Their last ledger line stays "started".
* A trial that dies of a signal the sweep did not send (kill -9, the OOM killer) or exits non-zero is "failed",
  with its error (``killed by SIGKILL (returncode -9; out of memory?)``, or the trial's own error line).
* Running the same command again skips finished trials and failed ones (``--retry-failed`` runs those again),
  and continues interrupted and started ones with ``--train.resume auto``. It first waits for trials a dead sweep
  left running to stop (mmtrain.sweep_ledger), and a second sweep on a folder in use is refused.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mmtrain.errors import UserError
from mmtrain.sweep_ledger import (
    LEDGER,
    append,
    check_ledger,
    folder_lock,
    read_ledger,
    started_at,
    wait_for_orphans,
    write_header,
)
from mmtrain.sweep_spec import SweepSpec, load_sweep
from mmtrain.sweep_trial import HEADER, Running, die_with_sweep, outcome, signal_trial

# Inherited from a `wandb agent` around this command, they would make every trial claim the agent's one run.
AGENT_ENV = ("WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH")
EPILOG = """examples:
  mmtrain sweep configs/sweep.yaml --count 6 -- --config configs/tiny.yaml
  mmtrain sweep configs/sweep.yaml --parallel 2 --out runs/lr-sweep -- --config configs/laptop.yaml
  mmtrain sweep configs/sweep.yaml --launcher accelerate --accelerate-config accelerate_configs/single_gpu.yaml

Everything after -- goes to every trial (after the sweep's parameters; naming a sweep parameter or
train.output_dir there is refused). Run the same command again to continue an interrupted sweep.
"""


class _SweepParser(argparse.ArgumentParser):
    """Everything after the first ``--`` is kept, as written, as the trials' overrides: argparse would read
    ``--config`` there as an option of ``sweep`` itself, or refuse ``--optim.lr``."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        cut = args.index("--") if "--" in args else len(args)
        parsed, extra = super().parse_known_args(args[:cut], namespace)
        parsed.overrides = args[cut + 1:]
        return parsed, extra


def add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``mmtrain sweep`` on the CLI's subparsers; its handler is :func:`run_sweep`."""
    parser_class, sub._parser_class = sub._parser_class, _SweepParser  # argparse offers no per-parser class
    try:
        p = sub.add_parser(
            "sweep", allow_abbrev=False, help="run a W&B sweep YAML locally, one training process per trial",
            description="Run the trials of a W&B sweep file (grid, random, or bayes via Optuna TPE) as "
                        "`mmtrain train` processes in SWEEP_DIR/trial-NNN, recorded in SWEEP_DIR/sweep.jsonl.",
            epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
            usage="mmtrain sweep [-h] SWEEP.yaml [--out SWEEP_DIR] [--count N] [--parallel P] [--seed S] "
                  "[--launcher {python,accelerate}] [--accelerate-config FILE] [--retry-failed] [-- OVERRIDES ...]")
    finally:
        sub._parser_class = parser_class
    p.add_argument("spec", metavar="SWEEP.yaml", help="a sweep file in W&B's format (configs/sweep.yaml)")
    p.add_argument("--out", metavar="SWEEP_DIR", help="folder of the trials and the ledger (default runs/<name>)")
    p.add_argument("--count", metavar="N", type=int, help="trials to run (grid default: the whole grid; random "
                                                           "and bayes: required, or the YAML's run_cap)")
    p.add_argument("--parallel", metavar="P", type=int, default=1, help="trials at once (default 1)")
    p.add_argument("--seed", metavar="S", type=int, help="random/bayes seed (default: derived from the sweep name)")
    p.add_argument("--launcher", choices=["python", "accelerate"], default="python",
                   help="accelerate: start each trial with `accelerate launch` (default python: one process)")
    p.add_argument("--accelerate-config", metavar="FILE", help="--config_file for accelerate launch")
    p.add_argument("--retry-failed", action="store_true", help="run failed trials again (default: keep them)")
    p.set_defaults(handler=run_sweep)


# ------------------------------------------------------------------------------------------- planning

class _Planner:
    """Parameters of trial ``i`` (1-based): the ledger's if recorded, else the grid point, the random draw,
    or Optuna TPE's suggestion (ask/tell; a re-run rebuilds the study from the ledger's results). The TPE sampler's
    seed is derived from the seed and the number of results it is told: add_trial does not advance its random
    state, so with the seed alone a continued sweep would suggest its first trials again."""

    def __init__(self, spec: SweepSpec, seed: int, recorded: dict[int, dict[str, Any]]) -> None:
        self.spec, self.seed, self.recorded = spec, seed, recorded
        self.grid = spec.grid() if spec.method == "grid" else []
        self.study, self.asked = None, {}
        if spec.method == "bayes":
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)  # our progress lines say it already
            self.searched = {p.name: p for p in spec.searched}
            self.dists = {p.name: p.optuna_distribution() for p in spec.searched}
            known = [rec for rec in recorded.values() if rec["status"] in ("finished", "failed")]
            sampler = optuna.samplers.TPESampler(seed=_derived_seed(seed, len(known)))
            self.study = optuna.create_study(direction=spec.goal, sampler=sampler)
            for rec in known:
                self.tell(rec["trial"], rec["params"], rec.get("metric"))

    def params(self, i: int) -> dict[str, Any]:
        if i in self.recorded:
            return self.recorded[i]["params"]
        if self.spec.method == "grid":
            return self.grid[i - 1]
        if self.spec.method == "random":
            return self.spec.sample(i, self.seed)
        trial = self.asked[i] = self.study.ask(self.dists)
        return {p.name: p.from_optuna(trial.params[p.name]) if p.name in self.dists else p.spec["value"]
                for p in self.spec.params}

    def tell(self, i: int, params: dict[str, Any], metric: float | None) -> None:
        if self.study is None:
            return
        import optuna

        state = optuna.trial.TrialState.COMPLETE if metric is not None else optuna.trial.TrialState.FAIL
        if i in self.asked:
            self.study.tell(self.asked.pop(i), metric, state=state)
        else:  # run by an earlier command: known from the ledger only
            self.study.add_trial(optuna.trial.create_trial(
                params={k: p.to_optuna(params[k]) for k, p in self.searched.items()}, distributions=self.dists,
                value=metric, state=state))


def _derived_seed(seed: int, told: int) -> int:
    return int(hashlib.sha256(f"mmtrain-sweep/{seed}/{told}".encode()).hexdigest()[:8], 16)


def _train_args(argv: list[str]) -> list[str] | None:
    """The words after ``mmtrain train`` in a trial's argv, or None when it runs some other program."""
    for i in range(len(argv) - 1):
        if argv[i].endswith("mmtrain") and argv[i + 1] == "train":
            return argv[i + 2:]
    return None


def check_trial_config(argv: list[str]) -> str | None:
    """What ``mmtrain train`` would refuse in this trial's config (a wrong value, an unknown field), or None:
    checked here, in milliseconds, instead of one failing process per trial."""
    words = _train_args(argv)
    if words is None:
        return None
    from mmtrain.config import load_config

    config, overrides, it = None, {}, iter(words)
    for word in it:
        name, eq, value = word.partition("=")
        if name == "--config":
            config = value if eq else next(it, None)
        elif name.startswith("--") and "." in name:
            overrides[name[2:]] = value if eq else next(it, "")
    try:
        load_config(config, overrides)
    except UserError as e:
        return str(e)
    return None


# -------------------------------------------------------------------------------------------- running

def _describe(params: dict[str, Any], spec: SweepSpec) -> str:
    shown = [p.name for p in spec.searched] or list(params)
    return " ".join(f"{k}={params[k]}" for k in shown if k in params)


def _progress(i: int, count: int, record: dict[str, Any], spec: SweepSpec, note: str = "") -> str:
    metric = f" {spec.metric}={record['metric']:.4g}" if record.get("metric") is not None else ""
    error = f": {record['error']}" if record.get("error") else ""
    took = f" ({record['seconds']:.1f}s)" if record.get("seconds") is not None else ""
    return (f"[{i}/{count}] trial-{i:03d} {_describe(record['params'], spec)} -> {record['status']}{note}"
            f"{metric}{took}{error}")


def run_sweep(args: argparse.Namespace) -> int:
    """The ``mmtrain sweep`` command (see the module docstring). Raises UserError for bad input."""
    spec = load_sweep(args.spec)
    overrides = list(args.overrides)
    taken = {p.name for p in spec.params} | {"train.output_dir"}
    for word in overrides:
        if word.startswith("--") and word[2:].partition("=")[0] in taken:
            raise UserError(f"-- {word}: {word[2:].partition('=')[0]} is set by the sweep ({spec.path}) for each "
                            "trial; remove it from the overrides (or from the sweep's parameters)")
    if args.parallel < 1 or (args.count is not None and args.count < 1):
        raise UserError("--parallel and --count must be >= 1")
    if args.accelerate_config and args.launcher != "accelerate":
        raise UserError("--accelerate-config needs --launcher accelerate")
    count = args.count or spec.raw.get("run_cap")
    if spec.method == "grid":
        count = min(count or len(spec.grid()), len(spec.grid()))
    elif not count:
        raise UserError(f"{spec.path}: method {spec.method} needs --count N (how many trials), or run_cap in the file")
    seed = args.seed if args.seed is not None else int(hashlib.sha256(spec.name.encode()).hexdigest()[:8], 16)
    out = Path(args.out or Path("runs") / spec.name)
    for folder in (out, *out.parents):  # the first that exists must be a folder
        if folder.exists():
            if not folder.is_dir():
                raise UserError(f"--out {out}" + (": " + str(folder) if folder != out else "") + " is a file, not a "
                                "folder; give a folder for the trials and the ledger (new or an earlier sweep's)")
            break
    seen = read_ledger(out / LEDGER)
    recorded, planner, todo = _plan(spec, seed, overrides, args, out, count)  # every check before any writing
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create this folder ({e.strerror})") from None
    with folder_lock(out):
        now = read_ledger(out / LEDGER)
        wait_for_orphans(out, now[1], _say)
        if now != seen:  # another sweep wrote to it before this one took the folder
            recorded, planner, todo = _plan(spec, seed, overrides, args, out, count)
        write_header(out / LEDGER, spec, seed, overrides)
        ignored = " (early_terminate is W&B's server's: not applied here)" if "early_terminate" in spec.raw else ""
        _say(f"mmtrain sweep {spec.name}: {spec.method}, {count} trial(s), {count - len(todo)} done before, "
             f"{args.parallel} at a time, in {out} (ledger {out / LEDGER}){ignored}")
        for i in range(1, count + 1):
            if i not in todo:
                _say(_progress(i, count, recorded[i], spec, " (earlier)"))
        results = {i: r for i, r in recorded.items() if i <= count}
        _run_trials(spec, args, out, overrides, count, recorded, planner, todo, results)
    _say("\n".join(ranked_table(spec, results)))
    return 0 if all(results.get(i, {}).get("status") == "finished" for i in range(1, count + 1)) else 1


def _plan(spec: SweepSpec, seed: int, overrides: list[str], args: argparse.Namespace, out: Path,
          count: int) -> tuple[dict[int, dict[str, Any]], _Planner, collections.deque[int]]:
    """(the trials recorded in the ledger, the planner, the trials to run); UserError when the ledger is another
    sweep's, or when ``mmtrain train`` would refuse a planned trial's config (grid and random)."""
    recorded = check_ledger(out / LEDGER, spec, seed, overrides)
    planner = _Planner(spec, seed, recorded)
    done = ("finished",) if args.retry_failed else ("finished", "failed")
    todo = collections.deque(i for i in range(1, count + 1) if recorded.get(i, {}).get("status") not in done)
    if spec.method != "bayes":  # every planned trial's config checked before any starts
        for i in todo:
            problem = check_trial_config(_argv(spec, i, planner.params(i), out, overrides, args, False))
            if problem:
                raise UserError(f"{spec.path}: trial {i} ({_describe(planner.params(i), spec)}): {problem}")
    return recorded, planner, todo


def _say(text: str) -> None:
    """Print a line of progress. With the terminal gone (a hang-up: EIO, or EPIPE) the lines go nowhere from then
    on, and the sweep goes on stopping its trials and recording them."""
    try:
        print(text, flush=True)
    except OSError:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # what is still buffered is flushed there, at exit too
            os.close(devnull)
        except (OSError, ValueError):
            pass


def _run_trials(spec: SweepSpec, args: argparse.Namespace, out: Path, overrides: list[str], count: int,
                recorded: dict[int, dict[str, Any]], planner: _Planner, todo: collections.deque[int],
                results: dict[int, dict[str, Any]]) -> None:
    """Run the trials in ``todo``, ``args.parallel`` at a time, into ``results``; on Ctrl-C, SIGTERM or SIGHUP,
    stop those running (each saves a checkpoint) and return."""
    ledger = out / LEDGER
    env = {k: v for k, v in os.environ.items() if k not in AGENT_ENV}
    if args.parallel > 1 and "OMP_NUM_THREADS" not in env:  # P trials share the cores instead of oversubscribing
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.parallel))
    running: dict[int, Running] = {}
    stop_on = [signal.SIGTERM]  # each stops the sweep like Ctrl-C; SIGHUP too, unless ignored (nohup)
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
        stop_on.append(signal.SIGHUP)
    previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in stop_on}
    try:
        try:
            while todo or running:
                while todo and len(running) < args.parallel:
                    i = todo.popleft()
                    run = _start(spec, i, planner.params(i), out, overrides, args, recorded.get(i), env, ledger,
                                 running)
                    if isinstance(run, dict):  # refused before starting (a bayes suggestion mmtrain refuses)
                        results[i] = run
                        planner.tell(i, run["params"], None)
                        _say(_progress(i, count, run, spec))
                time.sleep(0.2)
                for i, run in list(running.items()):
                    if run.proc.poll() is not None:
                        results[i] = _finish(running.pop(i), spec, False, ledger, planner, count)
        except KeyboardInterrupt:
            _stop(running, spec, args.launcher, ledger, planner, count, results)
            _say(f"mmtrain: sweep interrupted; run the same command again to continue ({ledger})")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _argv(spec: SweepSpec, i: int, params: dict[str, Any], out: Path, overrides: list[str],
          args: argparse.Namespace, resume: bool) -> list[str]:
    """The trial's command: the YAML's, expanded, then its folder and group, the user's overrides, and
    ``--train.resume=auto`` when it continues an earlier attempt."""
    folder = out / f"trial-{i:03d}"
    argv = [*spec.trial_argv(params, folder / "sweep_params.json"), f"--train.output_dir={folder}",
            f"--wandb.group={spec.name}", *overrides, *(["--train.resume=auto"] if resume else [])]
    if args.launcher == "accelerate":
        if argv[0] != sys.executable or argv[1:3] == ["-m", "accelerate.commands.launch"]:
            raise UserError(f"{spec.path}: command: --launcher accelerate needs a command that starts with "
                            "${interpreter} or mmtrain (this one is launched already, or runs another program)")
        config = ["--config_file", args.accelerate_config] if args.accelerate_config else []
        argv = [sys.executable, "-m", "accelerate.commands.launch", *config, *argv[1:]]
    return argv


def _start(spec: SweepSpec, i: int, params: dict[str, Any], out: Path, overrides: list[str],
           args: argparse.Namespace, before: dict[str, Any] | None, env: dict[str, str], ledger: Path,
           running: dict[int, Running]) -> Running | dict[str, Any]:
    """Start trial ``i`` into ``running`` (its "started" ledger line records its pid), or return the failed record
    of a trial config ``mmtrain train`` would refuse."""
    folder = out / f"trial-{i:03d}"
    folder.mkdir(parents=True, exist_ok=True)  # train.log lives here: not a run output (run_dir.RUN_OUTPUTS)
    attempt = (before or {}).get("attempt", 0) + 1
    (folder / "sweep_params.json").write_text(json.dumps(params))  # also ${args_json_file}
    argv = _argv(spec, i, params, out, overrides, args, resume=before is not None)
    problem = check_trial_config(argv)
    if problem:
        record = {"trial": i, "params": params, "status": "failed", "metric": None, "returncode": None,
                  "output_dir": str(folder), "seconds": 0.0, "attempt": attempt, "error": problem}
        append(ledger, record)
        return record
    log = (folder / "train.log").open("a")
    log.write(f"{HEADER}trial {i}, attempt {attempt}: {' '.join(argv)}\n")
    log.flush()
    # Its own session: a Ctrl-C at the terminal reaches the sweep only, which asks each trial to save and stop;
    # and its pid names its process group, which still_running() looks for after a sweep that died.
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True, preexec_fn=die_with_sweep())
    run = running[i] = Running(i, params, folder, proc, log, time.monotonic(), attempt)
    append(ledger, {"trial": i, "params": params, "status": "started", "output_dir": str(folder),
                    "attempt": attempt, "argv": argv, "pid": proc.pid, "pid_created": started_at(proc.pid)})
    return run


def _finish(run: Running, spec: SweepSpec, stopping: bool, ledger: Path, planner: _Planner,
            count: int) -> dict[str, Any]:
    run.log.close()
    record = outcome(run, spec.metric, stopping)
    append(ledger, record)
    if record["status"] != "interrupted":
        planner.tell(run.trial, run.params, record["metric"])
    _say(_progress(run.trial, count, record, spec))
    return record


def _stop(running: dict[int, Running], spec: SweepSpec, launcher: str, ledger: Path, planner: _Planner,
          count: int, results: dict[int, dict[str, Any]]) -> None:
    """Ctrl-C / SIGTERM / SIGHUP: every running trial is asked to save and stop; a second one kills them."""
    if running:
        _say(f"mmtrain: stopping {len(running)} running trial(s): each saves a checkpoint and exits "
             "(Ctrl-C again to kill them)")
    for run in running.values():
        signal_trial(run, launcher, signal.SIGTERM)
    try:
        for run in running.values():
            run.proc.wait()
    except KeyboardInterrupt:
        for run in running.values():
            signal_trial(run, launcher, signal.SIGKILL)
            run.proc.wait()
    for i in list(running):
        results[i] = _finish(running.pop(i), spec, True, ledger, planner, count)


def ranked_table(spec: SweepSpec, results: dict[int, dict[str, Any]]) -> list[str]:
    """The trials ranked by the metric (best first, by the goal); trials without a value last, in order."""
    def key(item: tuple[int, dict[str, Any]]) -> tuple:
        metric = item[1].get("metric")
        return (metric is None, (metric if spec.goal == "minimize" else -metric) if metric is not None else 0,
                item[0])

    names = [p.name for p in spec.searched] or sorted({k for r in results.values() for k in r["params"]})
    header = ["rank", "trial", "status", spec.metric, *names]
    rows = [[str(rank) if r.get("metric") is not None else "-", f"trial-{i:03d}", r["status"],
             f"{r['metric']:.6g}" if r.get("metric") is not None else "-",
             *(str(r["params"].get(n, "")) for n in names)]
            for rank, (i, r) in enumerate(sorted(results.items(), key=key), start=1)]
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
    finished = sum(r["status"] == "finished" for r in results.values())
    title = (f"== sweep {spec.name}: {finished} of {len(results)} trial(s) finished, ranked by {spec.metric} "
             f"({spec.goal}) ==")
    return ["", title, *("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                         for row in [header, *rows])]
