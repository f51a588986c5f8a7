"""Allocation churn: ``train.reuse_host_memory`` on against off, as whole ``mmtrain train`` processes.

    python benchmarks/bench_host_memory.py                     # laptop preset, 6 pairs (~4 min)
    python benchmarks/bench_host_memory.py --repeats 2 --steps 3 --preset tiny   # smoke

The setting is process-wide (glibc's ``mallopt``) and cannot be undone inside a process, so the arms are
separate processes: pairs of ``python -m mmtrain train`` runs (telemetry off, W&B disabled, no media),
``--steps`` optimizer steps each (default: the first epoch less one step, at most 150), the order flipped
every pair. Per run, from the kernel's accounting of the child (``os.wait4``): minor page faults and
system (kernel) CPU seconds, and the run's own ``train_time_seconds``. Reported per arm: medians, and the
median over pairs of the speed ratio ``off train time / on train time`` (> 1: reusing memory is faster).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from telemetry_overhead import first_epoch_steps  # noqa: E402

QUIET = ["--wandb.telemetry", "false", "--wandb.mode", "disabled", "--wandb.media_samples", "0",
         "--train.progress_bar", "false"]


def run(preset: str, reuse: bool, steps: int, tmp: Path) -> dict[str, float]:
    """One training process: its train_time_seconds, minor page faults and kernel CPU seconds."""
    out = tmp / f"{'on' if reuse else 'off'}-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "mmtrain", "train", "--config", str(REPO / "configs" / f"{preset}.yaml"),
           "--train.output_dir", str(out), "--train.max_steps", str(steps),
           "--train.reuse_host_memory", str(reuse).lower(), *QUIET]
    with open(tmp / "log.txt", "a") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}); see {tmp / 'log.txt'}")
    train = json.loads((out / "summary.json").read_text())["train_time_seconds"]
    return {"train_s": train, "faults": usage.ru_minflt, "sys_s": usage.ru_stime}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="laptop", help="configs/<preset>.yaml (laptop)")
    parser.add_argument("--repeats", type=int, default=6, help="pairs of runs (6)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: first epoch - 1, "
                                                                  "at most 150)")
    args = parser.parse_args()
    steps = args.steps or min(150, first_epoch_steps(args.preset) - 1)
    print(f"{args.repeats} pairs of `mmtrain train` x {steps} steps ({args.preset}), reuse_host_memory on/off",
          flush=True)
    runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="mmtrain-host-memory-") as tmp_name:
        tmp = Path(tmp_name)
        for r in range(args.repeats):
            for reuse in (False, True) if r % 2 == 0 else (True, False):
                runs[reuse].append(run(args.preset, reuse, steps, tmp))
                m = runs[reuse][-1]
                print(f"  pair {r + 1}/{args.repeats} {'on ' if reuse else 'off'}: train {m['train_s']:6.2f} s, "
                      f"{m['faults'] / steps:7.0f} page faults/step, kernel {1000 * m['sys_s'] / steps:5.2f} ms/step",
                      flush=True)
    med = statistics.median
    speed = [off["train_s"] / on["train_s"] for off, on in zip(runs[False], runs[True], strict=True)]
    print("\n| reuse_host_memory | train s | page faults / step | kernel ms / step |\n|---|---:|---:|---:|")
    for reuse in (False, True):
        rows = runs[reuse]
        print(f"| {'true' if reuse else 'false'} | {med(m['train_s'] for m in rows):.2f} | "
              f"{med(m['faults'] for m in rows) / steps:.0f} | {1000 * med(m['sys_s'] for m in rows) / steps:.2f} |")
    print(f"\nspeed on/off (median of {len(speed)} paired ratios): {med(speed):.3f} "
          f"(range {min(speed):.3f}-{max(speed):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
