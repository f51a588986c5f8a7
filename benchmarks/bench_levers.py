"""Speed levers of mmtrain's training step, each A/B'd against the baseline in one process, interleaved.

    python benchmarks/bench_levers.py                                   # laptop preset, CPU, fp32 (~6 min)
    python benchmarks/bench_levers.py --preset tiny --rounds 1 --steps 2   # smoke
    python benchmarks/bench_levers.py --gpu                             # default preset, CUDA, bf16

Arms (each an ``mmtrain.trainer.Trainer`` as ``bench_train.py``'s ``mmtrain-off``: no telemetry, no W&B,
no media, no checkpoint inside the run; the same preset, seed and data order):

* ``baseline``: ``train.channels_last false``, ``train.compile none`` (and, with ``--gpu``, cuDNN
  autotuning off during its blocks);
* ``channels_last``: ``train.channels_last true``;
* ``compile``: ``train.compile <--compile-mode>`` (Accelerate's TorchDynamoPlugin, inductor);
* ``cudnn_benchmark`` (``--gpu`` only): the baseline's settings with ``torch.backends.cudnn.benchmark``
  on during its blocks (what ``build_accelerator`` sets on CUDA).

Each arm runs its own continuous ``train_epoch`` loop in a thread that pauses every ``--steps``
optimizer steps (``bench_train.Stepper``); only one runs at a time. First every arm runs one step
alone, timed: the compile arm's first step minus the baseline's is the compile time (tracing and
inductor's code generation; ``--fresh-inductor-cache`` makes it a cold compile, otherwise torch's
on-disk cache from an earlier run may shorten it). Then rounds of one block per arm, the order
reversed every round; round 0 is warm-up. Per lever: the median over rounds of the block's ms/step,
and of the ratio lever / baseline taken within each round (drift cancels), with the ratio's IQR.
Break-even steps for compile = compile seconds / (baseline s/step x (1 - median ratio)): the run
length from which compiling pays off (``never`` when compiled steps are not faster).

Accelerate keeps one process-wide ``AcceleratorState``, whose ``dynamo_plugin`` is the first
Accelerator's; each arm is built with the state's plugin set to its own (``_dynamo_state``), which is
what a fresh process running that configuration would have.
"""

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_train import MmtrainTrainer, Stepper, Variant, bench_config, timed_block  # noqa: E402

LEVERS = ("channels_last", "compile", "cudnn_benchmark")
GPU_ONLY = ("cudnn_benchmark",)


@contextlib.contextmanager
def _dynamo_state(compile_value: str) -> Iterator[None]:
    """While an arm's Trainer is built (and ``prepare`` compiles or not), the process-wide
    AcceleratorState holds that arm's dynamo plugin; afterwards the previous one is put back."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import TorchDynamoPlugin

    from mmtrain.speed import dynamo_plugin

    shared = AcceleratorState._shared_state
    before = shared.get("dynamo_plugin")
    if "dynamo_plugin" in shared:
        shared["dynamo_plugin"] = dynamo_plugin(compile_value) or TorchDynamoPlugin(backend="no")
    try:
        yield
    finally:
        if before is not None:
            shared["dynamo_plugin"] = before


class Arm(MmtrainTrainer):
    """One configuration of the Trainer: the baseline's ``train`` fields with ``train`` overrides;
    ``cudnn_benchmark`` is the global flag during this arm's blocks (GPU)."""

    def __init__(self, name: str, train: dict, cudnn_benchmark: bool, preset: str, total_steps: int,
                 precision: str, cuda: bool, tmp: Path) -> None:
        from mmtrain.trainer import Trainer

        base = bench_config(preset, tmp / name, total_steps, precision)
        cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, **train))
        Variant.__init__(self, None, cfg, total_steps, cuda, preset, tmp)
        self.name, self.cudnn_benchmark = name, cudnn_benchmark
        with _dynamo_state(cfg.train.compile):
            self.trainer = Trainer(cfg)


def arms_for(levers: list[str], compile_mode: str, cuda: bool) -> dict[str, tuple[dict, bool]]:
    """name -> (train overrides, cuDNN autotuning during its blocks)."""
    baseline = {"channels_last": "false", "compile": "none"}
    arms = {"baseline": (baseline, False)}
    for lever in levers:
        if lever == "channels_last":
            arms[lever] = ({**baseline, "channels_last": "true"}, False)
        elif lever == "compile":
            arms[lever] = ({**baseline, "compile": compile_mode}, False)
        elif lever == "cudnn_benchmark" and cuda:
            arms[lever] = (baseline, True)
    return arms


def measure(preset: str, levers: list[str], rounds: int, steps: int, compile_mode: str, precision: str,
            cuda: bool) -> tuple[list[dict], dict[str, float]]:
    """Rows per lever (ms/step of baseline and lever, median ratio and its IQR) and each arm's first
    step in seconds."""
    total = 1 + (rounds + 1) * steps
    with tempfile.TemporaryDirectory(prefix=f"mmtrain-bench-levers-{preset}-") as tmp:
        os.environ.update(WANDB_MODE="disabled", WANDB_DIR=tmp, WANDB_SILENT="true")
        arms = {name: Arm(name, train, cudnn, preset, total, precision, cuda, Path(tmp))
                for name, (train, cudnn) in arms_for(levers, compile_mode, cuda).items()}
        steppers = {name: Stepper(arm) for name, arm in arms.items()}
        names = list(arms)
        first, dts = {}, {name: [] for name in names}
        try:
            for name in names:
                torch.backends.cudnn.benchmark = arms[name].cudnn_benchmark
                first[name] = timed_block(steppers[name], 1, cuda)[0]
                print(f"  {preset} {name}: first step {first[name]:.2f} s", flush=True)
            for r in range(rounds + 1):
                for name in names if r % 2 == 0 else names[::-1]:
                    torch.backends.cudnn.benchmark = arms[name].cudnn_benchmark
                    dt = timed_block(steppers[name], steps, cuda)[0]
                    if r > 0:  # round 0 is warm-up
                        dts[name].append(dt)
        finally:
            for stepper in steppers.values():
                stepper.close()
    rows = []
    for name in names[1:]:
        ratios = [lever / base for lever, base in zip(dts[name], dts["baseline"], strict=True)]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0], ratios[0], ratios[0]]
        rows.append({"preset": preset, "lever": name, "base_ms": 1000 * statistics.median(dts["baseline"]),
                     "lever_ms": 1000 * statistics.median(dts[name]), "ratio": statistics.median(ratios),
                     "iqr": (q[0], q[2])})
    return rows, first


def break_even(compile_s: float, base_ms: float, ratio: float) -> str:
    """Steps after which compiling has paid for its compile time: the time saved per step is the
    baseline's ms/step times (1 - the median within-round ratio), so drift between rounds cancels as
    in the ratio itself; ``never`` if compiled steps are not faster."""
    saved_s = base_ms * (1 - ratio) / 1000
    return f"{compile_s / saved_s:.0f}" if saved_s > 0 else "never"


def table(rows: list[dict], first: dict[str, float]) -> list[str]:
    lines = ["| preset | lever | baseline ms/step | lever ms/step | ratio (lever/baseline) | ratio IQR | "
             "compile s | break-even steps |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        extra = ("", "")
        if r["lever"] == "compile":
            compile_s = first["compile"] - first["baseline"]
            extra = (f"{compile_s:.1f}", break_even(compile_s, r["base_ms"], r["ratio"]))
        lines.append(f"| {r['preset']} | {r['lever']} | {r['base_ms']:.1f} | {r['lever_ms']:.1f} | {r['ratio']:.3f} | "
                     f"{r['iqr'][0]:.3f}-{r['iqr'][1]:.3f} | {extra[0]} | {extra[1]} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="configs/<preset>.yaml (default: laptop; with --gpu: default)")
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=LEVERS,
                        help="levers to compare with the baseline (cudnn_benchmark: --gpu only)")
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds after the warm-up one")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per block")
    parser.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"])
    parser.add_argument("--fresh-inductor-cache", action="store_true",
                        help="compile into an empty TORCHINDUCTOR_CACHE_DIR: a cold compile time")
    parser.add_argument("--gpu", action="store_true", help="run on CUDA in bf16")
    args = parser.parse_args()

    cuda = args.gpu
    if cuda and not torch.cuda.is_available():
        print("bench_levers: --gpu asked for, but CUDA is not available here: GPU figures skipped.")
        return 0
    levers = [lever for lever in args.levers if cuda or lever not in GPU_ONLY]
    preset = args.preset or ("default" if cuda else "laptop")
    precision = "bf16" if cuda else "no"
    import accelerate

    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} torch threads"
    print(f"torch {torch.__version__}, accelerate {accelerate.__version__}; {device}; precision {precision}; "
          f"{preset}: {args.rounds} rounds x {args.steps} steps, levers {' '.join(levers)}", flush=True)
    with contextlib.ExitStack() as stack:
        if args.fresh_inductor_cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = stack.enter_context(tempfile.TemporaryDirectory())
        t = time.perf_counter()
        rows, first = measure(preset, levers, args.rounds, args.steps, args.compile_mode, precision, cuda)
    print(f"({time.perf_counter() - t:.0f} s)\n")
    print("\n".join(table(rows, first)))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
