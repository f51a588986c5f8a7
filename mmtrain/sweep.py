"""``mmtrain sweep SWEEP.yaml``: run a W&B-format sweep locally, one ``mmtrain train`` subprocess per trial.

The YAML is the one ``wandb sweep`` takes (mmtrain.sweep_spec reads it). Each trial runs the YAML's
``command``, expanded as ``wandb agent`` would, plus ``--train.output_dir=SWEEP_DIR/trial-NNN``,
``--wandb.group=<sweep name>`` and the overrides given after ``--``, with its output in
``trial-NNN/train.log``. ``SWEEP_DIR/sweep.jsonl`` is the ledger: a header line (the spec as parsed, its
sha256, the seed, the overrides), then one line per trial event; the last line of a trial wins. Running
the same command again skips finished (and failed) trials and continues interrupted ones with
``--train.resume auto``. Exit status: 0 when every trial finished, 1 otherwise, 2 for bad input.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mmtrain.errors import UserError
from mmtrain.sweep_spec import SweepSpec, load_sweep

LEDGER = "sweep.jsonl"
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


# --------------------------------------------------------------------------------------------- ledger

def _append(path: Path, record: dict[str, Any]) -> None:
    """One JSON line, fsynced: a sweep killed at any moment keeps every line written before."""
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
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
            if "trial" in record:
                trials[record["trial"]] = record
            elif header is None:
                header = record
    return header, trials


def _check_ledger(path: Path, spec: SweepSpec, seed: int, overrides: list[str]) -> dict[int, dict[str, Any]]:
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


def _write_header(path: Path, spec: SweepSpec, seed: int, overrides: list[str]) -> None:
    if read_ledger(path)[0] is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _append(path, {"sweep": spec.name, "spec_file": str(spec.path), "spec_sha256": spec.digest, "spec": spec.raw,
                       "method": spec.method, "metric": {"name": spec.metric, "goal": spec.goal}, "seed": seed,
                       "overrides": overrides, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})


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

@dataclasses.dataclass
class _Running:
    trial: int
    params: dict[str, Any]
    folder: Path
    proc: subprocess.Popen
    log: Any
    started: float
    attempt: int


def _metric(folder: Path, name: str) -> tuple[dict[str, Any] | None, float | None]:
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


def _error_line(log: Path) -> str:
    """The trial's own error line (``mmtrain: error: ...``) or the last line it printed."""
    try:
        with log.open("rb") as f:
            f.seek(max(0, log.stat().st_size - 65536))
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if "error:" in line]
    return (errors or lines or [""])[-1][-300:]


def _outcome(run: _Running, spec: SweepSpec, stopping: bool) -> dict[str, Any]:
    rc = run.proc.returncode
    summary, metric = _metric(run.folder, spec.metric)
    finished = rc == 0 and summary is not None and "status" not in summary  # a stopped run's summary has status
    preempted = rc == 0 and summary is not None and summary.get("status") == "preempted"
    status = "finished" if finished else "interrupted" if stopping or preempted else "failed"
    record = {"trial": run.trial, "params": run.params, "status": status, "metric": metric if finished else None,
              "returncode": rc, "output_dir": str(run.folder), "seconds": round(time.monotonic() - run.started, 1),
              "attempt": run.attempt}
    if status == "failed":
        record["error"] = _error_line(run.folder / "train.log")
    return record


def _describe(params: dict[str, Any], spec: SweepSpec) -> str:
    shown = [p.name for p in spec.searched] or list(params)
    return " ".join(f"{k}={params[k]}" for k in shown if k in params)


def _progress(i: int, count: int, record: dict[str, Any], spec: SweepSpec, note: str = "") -> str:
    metric = f" {spec.metric}={record['metric']:.4g}" if record.get("metric") is not None else ""
    error = f": {record['error']}" if record.get("error") else ""
    took = f" ({record['seconds']:.1f}s)" if record.get("seconds") is not None else ""
    return (f"[{i}/{count}] trial-{i:03d} {_describe(record['params'], spec)} -> {record['status']}{note}"
            f"{metric}{took}{error}")


def _signal_trial(run: _Running, launcher: str, sig: int) -> None:
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
    ledger = out / LEDGER
    recorded = _check_ledger(ledger, spec, seed, overrides)
    planner = _Planner(spec, seed, recorded)
    done = ("finished",) if args.retry_failed else ("finished", "failed")
    todo = collections.deque(i for i in range(1, count + 1) if recorded.get(i, {}).get("status") not in done)
    if spec.method != "bayes":  # every planned trial's config checked before any starts
        for i in todo:
            problem = check_trial_config(_argv(spec, i, planner.params(i), out, overrides, args, False))
            if problem:
                raise UserError(f"{spec.path}: trial {i} ({_describe(planner.params(i), spec)}): {problem}")
    _write_header(ledger, spec, seed, overrides)
    ignored = " (early_terminate is W&B's server's: not applied here)" if "early_terminate" in spec.raw else ""
    print(f"mmtrain sweep {spec.name}: {spec.method}, {count} trial(s), {count - len(todo)} done before, "
          f"{args.parallel} at a time, in {out} (ledger {ledger}){ignored}", flush=True)
    for i in range(1, count + 1):
        if i not in todo:
            print(_progress(i, count, recorded[i], spec, " (earlier)"), flush=True)
    env = {k: v for k, v in os.environ.items() if k not in AGENT_ENV}
    if args.parallel > 1 and "OMP_NUM_THREADS" not in env:  # P trials share the cores instead of oversubscribing
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.parallel))
    running: dict[int, _Running] = {}
    results = {i: r for i, r in recorded.items() if i <= count}
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # a SIGTERM stops the sweep like Ctrl-C
    try:
        try:
            while todo or running:
                while todo and len(running) < args.parallel:
                    i = todo.popleft()
                    run = _start(spec, i, planner.params(i), out, overrides, args, recorded.get(i), env, ledger)
                    if isinstance(run, dict):  # refused before starting (a bayes suggestion mmtrain refuses)
                        results[i] = run
                        planner.tell(i, run["params"], None)
                        print(_progress(i, count, run, spec), flush=True)
                    else:
                        running[i] = run
                time.sleep(0.2)
                for i, run in list(running.items()):
                    if run.proc.poll() is not None:
                        results[i] = _finish(running.pop(i), spec, False, ledger, planner, count)
        except KeyboardInterrupt:
            _stop(running, spec, args.launcher, ledger, planner, count, results)
            print(f"mmtrain: sweep interrupted; run the same command again to continue ({ledger})", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print("\n".join(ranked_table(spec, results)), flush=True)
    return 0 if all(results.get(i, {}).get("status") == "finished" for i in range(1, count + 1)) else 1


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
           args: argparse.Namespace, before: dict[str, Any] | None, env: dict[str, str],
           ledger: Path) -> _Running | dict[str, Any]:
    folder = out / f"trial-{i:03d}"
    folder.mkdir(parents=True, exist_ok=True)  # train.log lives here: not a run output (run_dir.RUN_OUTPUTS)
    attempt = (before or {}).get("attempt", 0) + 1
    (folder / "sweep_params.json").write_text(json.dumps(params))  # also ${args_json_file}
    argv = _argv(spec, i, params, out, overrides, args, resume=before is not None)
    problem = check_trial_config(argv)
    if problem:
        record = {"trial": i, "params": params, "status": "failed", "metric": None, "returncode": None,
                  "output_dir": str(folder), "seconds": 0.0, "attempt": attempt, "error": problem}
        _append(ledger, record)
        return record
    _append(ledger, {"trial": i, "params": params, "status": "started", "output_dir": str(folder),
                     "attempt": attempt, "argv": argv})
    log = (folder / "train.log").open("a")
    log.write(f"== mmtrain sweep: trial {i}, attempt {attempt}: {' '.join(argv)}\n")
    log.flush()
    # Its own session: a Ctrl-C at the terminal reaches the sweep only, which asks each trial to save and stop.
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    return _Running(i, params, folder, proc, log, time.monotonic(), attempt)


def _finish(run: _Running, spec: SweepSpec, stopping: bool, ledger: Path, planner: _Planner,
            count: int) -> dict[str, Any]:
    run.log.close()
    record = _outcome(run, spec, stopping)
    _append(ledger, record)
    if record["status"] != "interrupted":
        planner.tell(run.trial, run.params, record["metric"])
    print(_progress(run.trial, count, record, spec), flush=True)
    return record


def _stop(running: dict[int, _Running], spec: SweepSpec, launcher: str, ledger: Path, planner: _Planner,
          count: int, results: dict[int, dict[str, Any]]) -> None:
    """Ctrl-C / SIGTERM: every running trial is asked to save and stop; a second Ctrl-C kills them."""
    if running:
        print(f"mmtrain: stopping {len(running)} running trial(s): each saves a checkpoint and exits "
              "(Ctrl-C again to kill them)", flush=True)
    for run in running.values():
        _signal_trial(run, launcher, signal.SIGTERM)
    try:
        for run in running.values():
            run.proc.wait()
    except KeyboardInterrupt:
        for run in running.values():
            _signal_trial(run, launcher, signal.SIGKILL)
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
