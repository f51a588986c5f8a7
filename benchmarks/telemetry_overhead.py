"""Telemetry overhead: what full telemetry (W&B offline) costs against telemetry off.

    python benchmarks/telemetry_overhead.py                          # whole runs, laptop preset (~8 min)
    python benchmarks/telemetry_overhead.py --repeats 12 --steps 150
    python benchmarks/telemetry_overhead.py --interleaved            # in one process, tiny and laptop presets
    python benchmarks/telemetry_overhead.py --interleaved --presets laptop --rounds 80

**Whole runs (default): what a user pays.** Each repeat runs ``python -m mmtrain train`` twice, as a
user would, one run per arm, the order flipped every repeat:

* **full**: every metric (``wandb.telemetry true``), ``log_frequency`` 10, the reconstruction grid every
  ``image_log_frequency`` steps and the caption table, W&B offline (its service process running), the
  sample metrics on the log steps' micro-batches (``--sample-metrics every_step``: on every micro-batch);
* **off**: ``wandb.telemetry false``, W&B disabled, no media.

Each run trains ``--steps`` optimizer steps (``train.max_steps``; by default 150 or the first epoch less
one step, so that no epoch end, with its validation pass and checkpoint, falls inside the run),
validates, checkpoints, exports and exits. Per run: its own ``train_time_seconds`` (summary.json: from
the first step to the export; the loop, the final validation and checkpoint included) and its process
wall time from the outside (imports, set-up, W&B's start-up and finish included). Reported per arm:
medians; the headline is the median over repeats of the paired speed ratio ``off train time / full train
time`` (1.00 = free; the issue's target: >= 0.98), with the fixed per-run cost of W&B (start-up and
finish: wall minus train time, full minus off) in seconds. Pairs are taken back to back, so slow drifts
of a shared machine cancel.

**Interleaved (``--interleaved``)**: two trainers built side by side in this process train in
alternating blocks of ``--steps`` optimizer steps (default 10 = one log window, so every "on" block
holds exactly one log step), the order flipped every round, each round on the same batches for both
arms. Fine-grained alternation resolves a 2% effect on a machine whose speed drifts by +-10% within
seconds, but the arms share the process: W&B's service process runs during both, and start-up and
finish are not measured. Reported: ``ratio`` (total on / total off time), the ``median`` and ``IQR``
of per-round on/off ratios, and ``cpu``, the total ratio in CPU seconds (this process plus W&B's).
The first round is warm-up and not timed; validation, checkpoints and start-up are excluded.
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmtrain.config import load_config  # noqa: E402
from mmtrain.trainer import Trainer  # noqa: E402

TARGET = 0.98  # issue 14: full telemetry >= 0.98 x the speed of telemetry off


def build(preset: str, out: Path, telemetry: bool, log_frequency: int, sample_metrics: str = "log_steps") -> Trainer:
    overrides = {
        "train.output_dir": str(out),
        "train.progress_bar": False,
        "train.epochs": 1000,  # the schedule is irrelevant here; blocks stop themselves
        "data.synthetic_train_size": 4627,  # the full synthetic set, so a block never runs out of data
        "data.synthetic_val_size": 514,
        "wandb.log_frequency": log_frequency,
        "wandb.telemetry": telemetry,
        "wandb.mode": "offline" if telemetry else "disabled",
        "wandb.sample_metrics": sample_metrics,
    }
    if not telemetry:
        overrides["wandb.media_samples"] = 0
    return Trainer(load_config(REPO / "configs" / f"{preset}.yaml", overrides))


def _cpu_seconds() -> float:
    """CPU time of this process and its children (W&B's writer runs as a child process)."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # it may exit between listing and reading
            total += sum(child.cpu_times()[:2])
    return total


def timed_block(trainer: Trainer, epoch: int, steps: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) per optimizer step over one block."""
    start_step = trainer.state.optimizer_step
    if trainer.state.batches_in_epoch + steps * trainer.cfg.train.gradient_accumulation_steps > \
            len(trainer.train_loader):
        trainer.state.batches_in_epoch = 0  # a new pass over the data: a block never runs into an epoch end
    if trainer.accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    cpu, wall = _cpu_seconds(), time.perf_counter()
    trainer.train_epoch(epoch, stop_at=start_step + steps)
    if trainer.accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    done = trainer.state.optimizer_step - start_step
    return (time.perf_counter() - wall) / done, (_cpu_seconds() - cpu) / done


def measure(preset: str, rounds: int, steps: int, log_frequency: int, sample_metrics: str = "log_steps") -> dict:
    with tempfile.TemporaryDirectory(prefix=f"mmtrain-bench-{preset}-") as tmp:
        arms = {"on": build(preset, Path(tmp) / "on", True, log_frequency, sample_metrics),
                "off": build(preset, Path(tmp) / "off", False, log_frequency)}
        wall: dict[str, list[float]] = {"on": [], "off": []}
        cpu: dict[str, list[float]] = {"on": [], "off": []}
        for trainer in arms.values():  # warm-up: allocator, caches, first W&B writes
            timed_block(trainer, 0, steps)
        for r in range(1, rounds + 1):
            for name in ("on", "off") if r % 2 else ("off", "on"):
                w, c = timed_block(arms[name], r, steps)
                wall[name].append(w)
                cpu[name].append(c)
        arms["on"].loggers.close()
    ratios = [a / b for a, b in zip(wall["on"], wall["off"], strict=True)]
    quartiles = statistics.quantiles(ratios, n=4)
    return {
        "preset": preset,
        "on_ms": 1000 * statistics.fmean(wall["on"]),
        "off_ms": 1000 * statistics.fmean(wall["off"]),
        "ratio": sum(wall["on"]) / sum(wall["off"]),
        "median": statistics.median(ratios),
        "iqr": (quartiles[0], quartiles[2]),
        "cpu": sum(cpu["on"]) / sum(cpu["off"]),
    }


ARMS = {
    "off": ["--wandb.telemetry", "false", "--wandb.mode", "disabled", "--wandb.media_samples", "0"],
    "full": ["--wandb.telemetry", "true", "--wandb.mode", "offline", "--wandb.log_frequency", "10"],
}


def first_epoch_steps(preset: str) -> int:
    """Optimizer steps in one epoch of the preset on one process."""
    cfg = load_config(REPO / "configs" / f"{preset}.yaml")
    batches = -(-cfg.data.synthetic_train_size // cfg.train.batch_size)
    return max(2, batches // cfg.train.gradient_accumulation_steps)


def whole_run(preset: str, arm: str, steps: int, tmp: Path, *extra: str) -> tuple[float, float]:
    """One ``mmtrain train`` process: (its summary's train_time_seconds, its wall time from the outside)."""
    out = tmp / f"{arm}-{time.monotonic_ns()}"
    env = {**os.environ, "WANDB_DIR": str(tmp / "wandb"), "WANDB_SILENT": "true"}
    env.pop("WANDB_MODE", None)
    cmd = [sys.executable, "-m", "mmtrain", "train", "--config", str(REPO / "configs" / f"{preset}.yaml"),
           "--train.output_dir", str(out), "--train.max_steps", str(steps), "--train.progress_bar", "false",
           *ARMS[arm], *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{arm} run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())["train_time_seconds"], wall


def measure_whole(preset: str, repeats: int, steps: int, warmup: bool = True,
                  sample_metrics: str = "log_steps") -> dict:
    with tempfile.TemporaryDirectory(prefix=f"mmtrain-overhead-{preset}-") as tmp_name:
        tmp = Path(tmp_name)
        for arm in ARMS if warmup else ():  # warm-up: the data caches, the page cache, wandb's first start
            whole_run(preset, arm, 2, tmp, "--optim.warmup_steps", "0")
        runs: dict[str, list[tuple[float, float]]] = {arm: [] for arm in ARMS}
        for r in range(repeats):
            for arm in ("off", "full") if r % 2 == 0 else ("full", "off"):
                runs[arm].append(whole_run(preset, arm, steps, tmp, "--wandb.sample_metrics", sample_metrics))
                train, wall = runs[arm][-1]
                print(f"  repeat {r + 1}/{repeats} {arm:<4}: train {train:6.2f} s "
                      f"({1000 * train / steps:6.1f} ms/step), process {wall:6.2f} s", flush=True)
    speed = [off[0] / full[0] for off, full in zip(runs["off"], runs["full"], strict=True)]
    process = [off[1] / full[1] for off, full in zip(runs["off"], runs["full"], strict=True)]
    fixed = [(full[1] - full[0]) - (off[1] - off[0]) for off, full in zip(runs["off"], runs["full"], strict=True)]
    med = statistics.median
    return {"preset": preset, "steps": steps, "repeats": repeats,
            "off_train": med(t for t, _ in runs["off"]), "full_train": med(t for t, _ in runs["full"]),
            "off_wall": med(w for _, w in runs["off"]), "full_wall": med(w for _, w in runs["full"]),
            "speed": med(speed), "speed_range": (min(speed), max(speed)),
            "process": med(process), "fixed": med(fixed)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interleaved", action="store_true", help="in one process, alternating blocks")
    parser.add_argument("--presets", nargs="+", default=None,
                        help="configs/<preset>.yaml (default: laptop; --interleaved: tiny laptop)")
    parser.add_argument("--repeats", type=int, default=8, help="whole runs: pairs of runs")
    parser.add_argument("--no-warmup", action="store_true", help="whole runs: skip the untimed first pair")
    parser.add_argument("--rounds", type=int, default=40, help="--interleaved: timed blocks per arm")
    parser.add_argument("--steps", type=int, default=None, help="whole runs: optimizer steps per run (default "
                        "150); --interleaved: per block (default 10; a multiple of the log frequency)")
    parser.add_argument("--log-frequency", type=int, default=10, help="--interleaved: the on arm's log frequency")
    parser.add_argument("--sample-metrics", choices=["log_steps", "every_step"], default="log_steps",
                        help="the full arm's wandb.sample_metrics (every_step: exact window statistics)")
    args = parser.parse_args()
    presets = args.presets or (["tiny", "laptop"] if args.interleaved else ["laptop"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}", flush=True)
    if not args.interleaved:
        results = []
        for preset in presets:
            steps = args.steps or min(150, first_epoch_steps(preset) - 1)
            print(f"whole runs: {args.repeats} pairs of `mmtrain train` processes x {steps} steps ({preset})",
                  flush=True)
            results.append(measure_whole(preset, args.repeats, steps, not args.no_warmup, args.sample_metrics))
        print("\n| preset | off train s | full train s | off process s | full process s | speed full/off "
              "(median, range) | process full/off | W&B fixed cost s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for res in results:
            lo, hi = res["speed_range"]
            print(f"| {res['preset']} | {res['off_train']:.2f} | {res['full_train']:.2f} | {res['off_wall']:.2f} | "
                  f"{res['full_wall']:.2f} | {res['speed']:.3f} ({lo:.3f}-{hi:.3f}) | {res['process']:.3f} | "
                  f"{res['fixed']:+.2f} |")
        for res in results:
            verdict = "meets" if res["speed"] >= TARGET else "BELOW"
            print(f"full telemetry speed vs off ({res['preset']}, whole runs): {res['speed']:.3f}  "
                  f"({verdict} the {TARGET} target)")
        return 0
    steps = args.steps or 10
    print(f"interleaved: {args.rounds} rounds x {steps} steps per arm, log_frequency {args.log_frequency}, "
          f"sample_metrics {args.sample_metrics}", flush=True)
    results = [measure(preset, args.rounds, steps, args.log_frequency, args.sample_metrics) for preset in presets]
    print(f"\n{'preset':<8} {'on ms/step':>11} {'off ms/step':>12} {'ratio':>7} {'median':>7} {'IQR':>13} {'cpu':>6}")
    for res in results:
        print(f"{res['preset']:<8} {res['on_ms']:>11.2f} {res['off_ms']:>12.2f} {res['ratio']:>7.3f} "
              f"{res['median']:>7.3f} {res['iqr'][0]:>6.3f}-{res['iqr'][1]:.3f} {res['cpu']:>6.3f}")
    for res in results:
        speed = 1 / res["ratio"]
        verdict = "meets" if speed >= TARGET else "BELOW"
        print(f"full telemetry speed vs off ({res['preset']}, interleaved): {speed:.3f}  "
              f"({verdict} the {TARGET} target)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
