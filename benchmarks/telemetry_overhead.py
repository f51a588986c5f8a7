"""Telemetry overhead: step time with full telemetry against telemetry off, interleaved in one run.

    python benchmarks/telemetry_overhead.py                       # tiny and laptop presets
    python benchmarks/telemetry_overhead.py --presets laptop --rounds 80

Two trainers are built side by side in this process from the same preset and seed:

* **on**: every metric (``wandb.telemetry true``), ``log_frequency`` 10, reconstruction grid every
  ``image_log_frequency`` steps, W&B offline (its writer process running, as in a real run);
* **off**: ``wandb.telemetry false``, W&B disabled, no media.

They train in alternating blocks of ``--steps`` optimizer steps (default 10 = one log window, so
every "on" block holds exactly one log step), the order flipped every round, each round on the
same batches for both arms. Fine-grained alternation is what makes a 2% effect measurable on a
shared 2-core machine whose speed drifts by +-10% within seconds. Reported:

* ``ratio``: total "on" time / total "off" time over all timed blocks (periodic costs such as
  the image grid every 100 steps are included) -- the headline figure;
* ``median`` and ``IQR``: the median and interquartile range of the per-round on/off ratios;
* ``cpu``: the total ratio in CPU seconds (this process plus W&B's writer process), which is
  blind to time the machine took away from us.

The first round is warm-up and not timed. Validation, checkpoints and start-up are excluded:
this is the training step.
"""

import argparse
import contextlib
import statistics
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

TARGET = 1.02


def build(preset: str, out: Path, telemetry: bool, log_frequency: int) -> Trainer:
    overrides = {
        "train.output_dir": str(out),
        "train.progress_bar": False,
        "train.epochs": 1000,  # the schedule is irrelevant here; blocks stop themselves
        "data.synthetic_train_size": 4627,  # the full synthetic set, so a block never runs out of data
        "data.synthetic_val_size": 514,
        "wandb.log_frequency": log_frequency,
        "wandb.telemetry": telemetry,
        "wandb.mode": "offline" if telemetry else "disabled",
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


def measure(preset: str, rounds: int, steps: int, log_frequency: int) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"mmtrain-bench-{preset}-") as tmp:
        arms = {"on": build(preset, Path(tmp) / "on", True, log_frequency),
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "laptop"])
    parser.add_argument("--rounds", type=int, default=40, help="timed blocks per arm")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per block; a multiple of the "
                                                               "log frequency keeps the blocks alike")
    parser.add_argument("--log-frequency", type=int, default=10)
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}; {args.rounds} rounds x {args.steps} steps per arm, "
          f"log_frequency {args.log_frequency}", flush=True)
    results = []
    for preset in args.presets:
        results.append(measure(preset, args.rounds, args.steps, args.log_frequency))
    print(f"\n{'preset':<8} {'on ms/step':>11} {'off ms/step':>12} {'ratio':>7} {'median':>7} {'IQR':>13} {'cpu':>6}")
    for res in results:
        print(f"{res['preset']:<8} {res['on_ms']:>11.2f} {res['off_ms']:>12.2f} {res['ratio']:>7.3f} "
              f"{res['median']:>7.3f} {res['iqr'][0]:>6.3f}-{res['iqr'][1]:.3f} {res['cpu']:>6.3f}")
    for res in results:
        verdict = "within" if res["ratio"] <= TARGET else "ABOVE"
        print(f"telemetry overhead ratio ({res['preset']}): {res['ratio']:.3f}  ({verdict} the {TARGET} target)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
