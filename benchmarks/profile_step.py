"""Where the time goes in one mmtrain training step: a torch.profiler table and a phase breakdown.

    python benchmarks/profile_step.py --preset laptop                  # full telemetry, W&B offline
    python benchmarks/profile_step.py --preset laptop --telemetry off  # wandb.telemetry false, W&B disabled
    python benchmarks/profile_step.py --preset laptop --set train.channels_last=true --trace step.json
    python benchmarks/profile_step.py --preset tiny --warmup 1 --steps 2   # smoke

It builds the real ``mmtrain.trainer.Trainer`` from ``configs/<preset>.yaml`` (as a user's run: telemetry
on, ``wandb.log_frequency`` of the preset, media on, W&B offline in a temporary ``WANDB_DIR``; only
checkpoints are turned off, they are not part of a step) and runs its real ``train_epoch``:

1. ``--warmup`` optimizer steps, not counted (allocator, caches, W&B's first writes);
2. ``--steps`` steps timed by the phase clock only: the breakdown without profiler overhead;
3. ``--steps`` more under ``torch.profiler`` (CPU, plus CUDA when the model is on a GPU), phase clock on:
   the operator table, and the breakdown again, so the profiler's own cost is visible.

**Phases.** Nothing in mmtrain is edited: the script wraps bound methods of the Trainer's own
components on the instance (and puts a forward pre-hook and hook on the model), each wrapper timing
its call with ``time.perf_counter`` and marking it with a ``torch.profiler.record_function`` range
(``mmtrain::<phase>``, visible in ``--trace``):

=================  ==========================================================================================
data wait          each ``next()`` on the loader inside ``Telemetry.timed`` (with ``num_workers 0``: decoding)
forward            the model's ``__call__``, first pre-hook to last hook (channels_last / autocast included)
backward           ``Accelerator.backward``
clip               ``Accelerator.clip_grad_norm_``
non-finite guard   ``NonFiniteGuard.add_loss``, ``Trainer.skip_step_if_nonfinite``, ``read_nonfinite_or_raise``
optimizer          the optimizer's ``step`` and ``zero_grad``, the scheduler's ``step``
telemetry          ``Telemetry.on_micro_batch``, ``on_optimizer_step``, ``on_skipped_step``, ``gather_log_record``
logging            ``Loggers.log`` (jsonl, W&B) and ``media.reconstructions``
other              the rest of the measured step: the loop, ``accumulate``, progress, the ranks' stop agreement
=================  ==========================================================================================

Each phase's time is **exclusive**: a phase called inside another (none is today, but a refactor could
nest them) is charged to the inner one only, so phases never double count. The measured step is the
wall time between the ends of consecutive optimizer steps (a wrapper on ``log_and_save_at_step_end``),
and ``other`` = measured - sum of phases, which is >= 0 by construction; the script prints the sum.
On CUDA the phases are host time (kernels run asynchronously and are waited for where the host reads a
value); the operator table then has a self-CUDA column.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmtrain.config import Config, load_config  # noqa: E402
from mmtrain.errors import UserError  # noqa: E402
from mmtrain.trainer import Trainer  # noqa: E402

PHASES = ("data wait", "forward", "backward", "clip", "non-finite guard", "optimizer", "telemetry", "logging")
OTHER = "other"
# (phase, attribute path from the Trainer, method name): the bound methods the clock wraps. A name that
# a later mmtrain no longer has is listed as missing in the output instead of failing.
WRAPPED: tuple[tuple[str, str, str], ...] = (
    ("backward", "accelerator", "backward"),
    ("clip", "accelerator", "clip_grad_norm_"),
    ("non-finite guard", "guard", "add_loss"),
    ("non-finite guard", "", "skip_step_if_nonfinite"),
    ("non-finite guard", "", "read_nonfinite_or_raise"),
    ("optimizer", "optimizer", "step"),
    ("optimizer", "optimizer", "zero_grad"),
    ("optimizer", "scheduler", "step"),
    ("telemetry", "telemetry", "on_micro_batch"),
    ("telemetry", "telemetry", "on_optimizer_step"),
    ("telemetry", "telemetry", "on_skipped_step"),
    ("telemetry", "telemetry", "gather_log_record"),
    ("logging", "loggers", "log"),
    ("logging", "media", "reconstructions"),
)


# --------------------------------------------------------------------------------------------------
# Building a Trainer as a user's run (shared with bench_growth.py)
# --------------------------------------------------------------------------------------------------

def preset_path(preset: str) -> Path:
    """``configs/<preset>.yaml``, or ``preset`` itself when it is a YAML file. Raises UserError otherwise."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    named = REPO / "configs" / f"{preset}.yaml"
    if not named.is_file():
        names = ", ".join(sorted(p.stem for p in (REPO / "configs").glob("*.yaml")))
        raise UserError(f"--preset {preset!r}: no such preset; use one of {names} or a path to a YAML config")
    return named


def bench_overrides(out: Path, telemetry: bool) -> dict[str, Any]:
    """Overrides that leave the preset's training step as a user runs it and take away what is not a
    step: no progress bar, no checkpoint, and an epoch count large enough that ``total_steps`` never
    stops a measurement. ``telemetry`` False: ``wandb.telemetry false``, W&B disabled, no media."""
    overrides: dict[str, Any] = {
        "train.output_dir": str(out), "train.overwrite": True, "train.progress_bar": False, "train.epochs": 1000,
        "checkpoint.every_steps": 0, "checkpoint.every_minutes": 0.0,
        "wandb.telemetry": telemetry, "wandb.mode": "offline" if telemetry else "disabled",
    }
    if not telemetry:
        overrides["wandb.media_samples"] = 0
    return overrides


def parse_sets(items: list[str]) -> dict[str, str]:
    """``--set section.field=value`` items as config overrides (values are parsed like the CLI's)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise UserError(f"--set {item!r}: expected section.field=value, e.g. --set train.channels_last=true")
        overrides[key] = value
    return overrides


@contextlib.contextmanager
def offline_wandb_env() -> Iterator[Path]:
    """A temporary folder for the run and W&B's files, W&B offline and silent; the environment is put
    back afterwards (the smoke tests call ``main`` in-process)."""
    saved = {k: os.environ.get(k) for k in ("WANDB_DIR", "WANDB_MODE", "WANDB_SILENT")}
    with tempfile.TemporaryDirectory(prefix="mmtrain-profile-") as tmp:
        os.environ.update({"WANDB_DIR": str(Path(tmp) / "wandb"), "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
        (Path(tmp) / "wandb").mkdir()
        try:
            yield Path(tmp)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def train_steps(trainer: Trainer, until: int) -> None:
    """Run the Trainer's own ``train_epoch`` until optimizer step ``until``. An epoch end starts the next
    pass over the data without validation or checkpoint (they are not part of a step)."""
    epoch = trainer.state.epoch
    while trainer.state.optimizer_step < until:
        if trainer.state.batches_in_epoch >= len(trainer.train_loader):
            epoch += 1
            trainer.state.epoch, trainer.state.batches_in_epoch = epoch, 0
        trainer.train_epoch(epoch, stop_at=until)


# --------------------------------------------------------------------------------------------------
# The phase clock
# --------------------------------------------------------------------------------------------------

@dataclass
class PhaseClock:
    """Exclusive wall time per phase: the time of the innermost open phase only (a stack), so nested
    calls never double count. ``boundaries`` are the perf_counter times at which optimizer steps ended."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    calls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    boundaries: list[float] = field(default_factory=list)
    on_boundary: Callable[[int], None] | None = None
    _stack: list[str] = field(default_factory=list)
    _mark: float = 0.0

    def _charge(self, now: float) -> None:
        if self._stack:
            self.seconds[self._stack[-1]] += now - self._mark
        self._mark = now

    def enter(self, phase: str) -> None:
        self._charge(time.perf_counter())
        self._stack.append(phase)
        self.calls[phase] += 1

    def exit(self) -> None:
        self._charge(time.perf_counter())
        self._stack.pop()

    @contextlib.contextmanager
    def phase(self, phase: str) -> Iterator[None]:
        with record_function(f"mmtrain::{phase}"):
            self.enter(phase)
            try:
                yield
            finally:
                self.exit()

    def snapshot(self) -> tuple[float, dict[str, float]]:
        """(now, exclusive seconds per phase so far), the open phase charged up to now."""
        now = time.perf_counter()
        self._charge(now)
        return now, dict(self.seconds)

    def step_ended(self) -> None:
        self.boundaries.append(time.perf_counter())
        if self.on_boundary is not None:
            self.on_boundary(len(self.boundaries))


def _wrap_method(obj: Any, name: str, phase: str, clock: PhaseClock) -> None:
    original = getattr(obj, name)

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        with clock.phase(phase):
            return original(*args, **kwargs)

    setattr(obj, name, timed)  # an instance attribute: only this Trainer's object is affected


def instrument(trainer: Trainer, clock: PhaseClock) -> list[str]:
    """Wrap the Trainer's components so that ``clock`` sees every phase and every step end. Returns the
    wrapped names that this mmtrain does not have (their time then falls into ``other``)."""
    missing = []
    for phase, path, name in WRAPPED:
        obj = getattr(trainer, path) if path else trainer
        if obj is None or not callable(getattr(obj, name, None)):
            missing.append(f"{path or 'Trainer'}.{name}")
            continue
        _wrap_method(obj, name, phase, clock)

    timed_loader = trainer.telemetry.timed

    def timed(loader: Any) -> Iterator[dict]:
        iterator = iter(timed_loader(loader))
        while True:
            with clock.phase("data wait"):
                batch = next(iterator, None)
            if batch is None:
                return
            yield batch

    trainer.telemetry.timed = timed

    # forward = the whole __call__ (hooks such as channels_last's conversion included): a pre-hook put
    # first and a hook put last. Not a phase() context, which cannot span two callbacks.
    ranges: list[Any] = []

    def before(module: torch.nn.Module, args: Any) -> None:
        ranges.append(record_function("mmtrain::forward").__enter__())
        clock.enter("forward")

    def after(module: torch.nn.Module, args: Any, output: Any) -> None:
        clock.exit()
        ranges.pop().__exit__(None, None, None)

    trainer.model.register_forward_pre_hook(before, prepend=True)
    trainer.model.register_forward_hook(after, always_call=True)

    watch_step_ends(trainer, clock.step_ended)
    return missing


def watch_step_ends(trainer: Trainer, callback: Callable[[], None]) -> None:
    """Call ``callback`` at the end of every optimizer step of ``trainer`` (after its logging and the
    ranks' stop agreement, the last thing a step does), by wrapping ``log_and_save_at_step_end``."""
    step_end = trainer.log_and_save_at_step_end

    def log_and_save_at_step_end(*args: Any, **kwargs: Any) -> bool:
        stop = step_end(*args, **kwargs)
        callback()
        return stop

    trainer.log_and_save_at_step_end = log_and_save_at_step_end


@dataclass
class Breakdown:
    """One window of ``steps`` optimizer steps: the measured wall time per step and each phase's share."""

    steps: int
    step_ms: float
    phase_ms: dict[str, float]  # per step, PHASES plus OTHER

    @classmethod
    def between(cls, start: tuple[float, dict[str, float]], end: tuple[float, dict[str, float]],
                steps: int) -> Breakdown:
        (t0, s0), (t1, s1) = start, end
        step_ms = 1000 * (t1 - t0) / steps
        phase_ms = {p: 1000 * (s1[p] - s0[p]) / steps for p in PHASES}
        phase_ms[OTHER] = step_ms - sum(phase_ms.values())
        return cls(steps, step_ms, phase_ms)


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------

def operator_rows(prof: profile, steps: int, step_ms: float, top: int) -> list[dict[str, Any]]:
    """The ``top`` events by self CPU time, per step; this script's own ``mmtrain::`` ranges are left
    out (they are the breakdown). Each: name, calls/step, self CPU ms/step, % of the measured step,
    CPU total ms/step, self CUDA ms/step (0 on CPU)."""
    events = [e for e in prof.key_averages() if not e.key.startswith("mmtrain::")]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    rows = []
    for e in events[:top]:
        self_ms = e.self_cpu_time_total / 1000 / steps  # the profiler counts microseconds
        rows.append({"name": e.key, "calls": e.count / steps, "self_cpu_ms": self_ms,
                     "percent": 100 * self_ms / step_ms, "cpu_total_ms": e.cpu_time_total / 1000 / steps,
                     "self_cuda_ms": getattr(e, "self_device_time_total", 0.0) / 1000 / steps})
    return rows


def operator_table(rows: list[dict[str, Any]], cuda: bool) -> str:
    head = "| operator | calls/step | self CPU ms/step | % of step | CPU total ms/step |" + (
        " self CUDA ms/step |" if cuda else "")
    lines = [head, "|---|---:|---:|---:|---:|" + ("---:|" if cuda else "")]
    for r in rows:
        line = (f"| `{r['name']}` | {r['calls']:.1f} | {r['self_cpu_ms']:.2f} | {r['percent']:.1f}% "
                f"| {r['cpu_total_ms']:.2f} |")
        lines.append(line + (f" {r['self_cuda_ms']:.2f} |" if cuda else ""))
    return "\n".join(lines)


PHASE_LABELS = {OTHER: "other (loop, accumulate, progress, stop agreement)"}


def breakdown_table(columns: dict[str, Breakdown]) -> str:
    """Phases as rows; per column ms/step and % of the measured step; then the sum and the measured step."""
    names = list(columns)
    lines = ["| phase | " + " | ".join(f"{n} ms/step | %" for n in names) + " |",
             "|---|" + "---:|---:|" * len(names)]
    for p in (*PHASES, OTHER):
        cells = " | ".join(f"{b.phase_ms[p]:.2f} | {100 * b.phase_ms[p] / b.step_ms:.1f}%" for b in columns.values())
        lines.append(f"| {PHASE_LABELS.get(p, p)} | {cells} |")
    sums = " | ".join(f"{sum(b.phase_ms.values()):.2f} | {100 * sum(b.phase_ms.values()) / b.step_ms:.1f}%"
                      for b in columns.values())
    lines.append(f"| sum of the rows | {sums} |")
    lines.append("| **measured step** | " + " | ".join(f"**{b.step_ms:.2f}** | 100%" for b in columns.values()) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------

def profile_run(cfg: Config, warmup: int, steps: int, top: int, trace: Path | None) -> dict[str, Any]:
    """Build the Trainer from ``cfg``, warm up, then one window of ``steps`` steps with the phase clock
    only and one under torch.profiler. Returns the breakdowns, operator rows and run facts."""
    trainer = Trainer(cfg)
    clock = PhaseClock()
    missing = instrument(trainer, clock)
    cuda = trainer.accelerator.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities)
    marks: dict[str, tuple[float, dict[str, float]]] = {}
    clock_only_end, profiled_end = warmup + steps, warmup + 2 * steps

    def on_boundary(step: int) -> None:  # called at the end of every optimizer step
        if cuda:
            torch.cuda.synchronize()  # the window's GPU work is inside the window
        if step == warmup:
            marks["clock"] = clock.snapshot()
        elif step == clock_only_end:
            marks["clock_end"] = clock.snapshot()
            prof.start()
            marks["profiled"] = clock.snapshot()  # after the profiler's start-up
        elif step == profiled_end:
            end = clock.snapshot()
            prof.stop()
            marks["profiled_end"] = end

    clock.on_boundary = on_boundary
    try:
        if warmup == 0:
            marks["clock"] = clock.snapshot()
        train_steps(trainer, profiled_end)
    finally:
        trainer.loggers.close()  # W&B finishes; its writer stops
    clock_only = Breakdown.between(marks["clock"], marks["clock_end"], steps)
    profiled = Breakdown.between(marks["profiled"], marks["profiled_end"], steps)
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    return {"breakdowns": {"no profiler": clock_only, "under torch.profiler": profiled},
            "operators": operator_rows(prof, steps, profiled.step_ms, top), "cuda": cuda, "missing": missing,
            "device": str(trainer.accelerator.device), "precision": trainer.accelerator.mixed_precision,
            "batch_size": cfg.train.batch_size, "accumulation": cfg.train.gradient_accumulation_steps,
            "workers": cfg.data.num_workers, "log_frequency": cfg.wandb.log_frequency}


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: sys.argv), profile, print the markdown tables. Returns the exit code: 0, or
    2 after one line for a bad preset or config value."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="laptop", help="configs/<preset>.yaml, or a YAML path (laptop)")
    parser.add_argument("--telemetry", choices=("on", "off"), default="on",
                        help="on: full telemetry, W&B offline (a user's run); off: wandb.telemetry false, W&B "
                             "disabled, no media")
    parser.add_argument("--warmup", type=int, default=5, help="optimizer steps before measuring (5)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per measured window (20)")
    parser.add_argument("--top", type=int, default=15, help="operators in the table (15)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="a config override, e.g. --set train.batch_size=64 (repeatable)")
    parser.add_argument("--trace", type=Path, help="also write the profiled window as a Chrome trace (JSON)")
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.steps < 1 or args.top < 1:
        parser.error("--warmup must be >= 0, --steps and --top >= 1")
    telemetry = args.telemetry == "on"
    try:
        path = preset_path(args.preset)
        with offline_wandb_env() as tmp:
            cfg = load_config(path, {**bench_overrides(tmp / "run", telemetry), **parse_sets(args.set)})
            result = profile_run(cfg, args.warmup, args.steps, args.top, args.trace)
    except UserError as e:
        print(f"profile_step: {e}", file=sys.stderr)
        return 2

    print(f"\n## mmtrain step profile: preset {args.preset}, telemetry {args.telemetry}"
          f"{' (W&B offline)' if telemetry else ' (W&B disabled)'}")
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, device {result['device']}, "
          f"precision {result['precision']}, batch {result['batch_size']} x {result['accumulation']} accumulation, "
          f"{result['workers']} data workers, log_frequency {result['log_frequency']}; {args.warmup} warm-up "
          f"steps, then {args.steps} steps with the phase clock only and {args.steps} under torch.profiler")
    if result["missing"]:
        print(f"\nnot found in this mmtrain (their time is in 'other'): {', '.join(result['missing'])}")
    print(f"\n### Top {args.top} operators by self CPU time ({args.steps} profiled steps, per step)\n")
    print(operator_table(result["operators"], result["cuda"]))
    print("\n### Where one step's time goes (exclusive wall time per phase)\n")
    print(breakdown_table(result["breakdowns"]))
    print()
    for name, b in result["breakdowns"].items():
        named = sum(b.phase_ms[p] for p in PHASES)
        print(f"{name}: phases {named:.2f} + other {b.phase_ms[OTHER]:.2f} = {named + b.phase_ms[OTHER]:.2f} ms "
              f"= measured step {b.step_ms:.2f} ms")
    if args.trace:
        print(f"trace: {args.trace} (open in chrome://tracing or https://ui.perfetto.dev)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
