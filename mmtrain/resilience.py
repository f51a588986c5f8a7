"""What the loop does when the world misbehaves: preemption signals, non-finite steps, OOM.

* :class:`StopSignals` turns SIGTERM/SIGUSR1 into a flag. The handler does no work: saving from
  inside a signal handler would run in the middle of a collective or a half-written step.
* :class:`StepAgreement` makes every rank take the same decision at a step boundary (stop,
  time-based checkpoint) with one small all-reduce on the *host*: over gloo, so a GPU job gains
  no device synchronisation for it.
* :class:`NonFiniteGuard` detects a non-finite loss or gradient on device, makes the fused AdamW
  step a no-op for that step (``found_inf``, the mechanism GradScaler uses), and counts on
  device. The host reads the counters only at log/checkpoint steps.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import multiprocessing
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from mmtrain.errors import TrainingError, shell_word

if TYPE_CHECKING:  # a type only: the loggers sit above this module
    from mmtrain.loggers.base import Loggers

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """SIGTERM / SIGUSR1 -> ``self.received`` (the last signal number), nothing else."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of DataLoader workers: SLURM signals every process of the job, and a worker
    killed by SIGTERM or SIGUSR1 would take the training step down with it before the main process
    can save. The main process shuts its workers down itself (see :func:`reap_workers_at_exit`)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _kill_daemonic_children() -> None:
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


@functools.cache  # register once per process
def reap_workers_at_exit() -> None:
    """Kill this process's daemonic multiprocessing children at exit, before multiprocessing's own
    exit hook would ``terminate()`` (SIGTERM) and then ``join()`` them: workers that ignore SIGTERM
    would make that join wait forever. Registered after multiprocessing's hook, so it runs first."""
    atexit.register(_kill_daemonic_children)


class StepAgreement:
    """Per-step agreement on host flags: every rank must call :meth:`any` at the same steps."""

    def __init__(self, num_processes: int) -> None:
        self.group = None
        self.distributed = num_processes > 1 and dist.is_available() and dist.is_initialized()
        if self.distributed and dist.get_backend() != "gloo":
            # NCCL would need a device tensor and a sync; a gloo group keeps this on the host.
            self.group = dist.new_group(backend="gloo")

    def any(self, *flags: bool) -> list[bool]:
        """For each flag: is it set on any rank?"""
        if not self.distributed:
            return list(flags)
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return [bool(v) for v in t.tolist()]


def slurm_job_to_requeue(environ: Mapping[str, str] | None = None) -> str | None:
    """The id that ``scontrol requeue`` must be given for this job, or None outside SLURM.

    A task of a job array is ``<SLURM_ARRAY_JOB_ID>_<SLURM_ARRAY_TASK_ID>``: its own SLURM_JOB_ID
    would do for most tasks, but the first task's SLURM_JOB_ID *is* the array's id, and
    ``scontrol requeue <array id>`` requeues every task of the array (Lightning #15022).
    """
    env = os.environ if environ is None else environ
    array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return env.get("SLURM_JOB_ID") or None


def requeue_slurm_job() -> str:
    """``scontrol requeue`` this job (or this task of a job array); returns what happened, for the log."""
    job = slurm_job_to_requeue()
    if not job:
        return "not under SLURM (no SLURM_JOB_ID): not requeued"
    if shutil.which("scontrol") is None:
        return f"scontrol not found: SLURM job {job} not requeued"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scontrol requeue {job} failed ({e})"
    if done.returncode != 0:
        return f"scontrol requeue {job} failed (exit {done.returncode}: {done.stderr.strip()})"
    return f"SLURM job {job} requeued"


def stop_lines(step: int, checkpoint: Path, requeue: bool, resume: str) -> list[str]:
    """What to print after the ranks agreed to stop on a signal; with ``requeue`` (SIGUSR1 under
    train.requeue, main rank only) the SLURM job is requeued first, when it would resume."""
    lines = [f"mmtrain: stopped by a signal at optimizer step {step}; checkpoint {checkpoint}"]
    if requeue:
        if resume == "auto":
            lines.append(f"mmtrain: {requeue_slurm_job()}")
        else:
            lines.append("mmtrain: not requeued: the requeued job would not resume; add --train.resume auto")
    lines.append(f"mmtrain: continue with the same command and --train.resume auto "
                 f"(or --train.resume {shell_word(checkpoint)})")
    return lines


@dataclass
class NonFiniteReport:
    total: int
    consecutive: int
    max_consecutive: int
    bad_steps: list[int]
    totals_at: list[int]  # for each of ``bad_steps``: the number of such steps up to and including it


class NonFiniteGuard:
    """Skip optimizer steps whose loss or gradient is not finite, without a host sync.

    Per optimizer step: ``bad = any rank's loss is non-finite or the global grad norm is`` (the
    norm is already global after DDP's all-reduce; the loss needs one 1-element all-reduce). The
    flag is handed to the fused AdamW as ``found_inf``: parameters, moments and the step count
    are left exactly as they were. Counters stay on device until :meth:`report`.
    """

    def __init__(self, device: torch.device, num_processes: int, limit: int = 5) -> None:
        self.device, self.limit = device, limit  # limit: train.max_nonfinite_steps
        self.distributed = num_processes > 1
        self.total = torch.zeros((), dtype=torch.int64, device=device)
        self.consecutive = torch.zeros((), dtype=torch.int64, device=device)
        self.max_consecutive = torch.zeros((), dtype=torch.int64, device=device)
        self._step_loss = torch.zeros((), dtype=torch.float32, device=device)
        self._flags: list[Tensor] = []

    def add_loss(self, loss: Tensor) -> None:
        """Every micro-batch: NaN/inf survive the sum, so one check per step covers them all."""
        self._step_loss = self._step_loss + loss.detach().float()

    def check_step(self, grad_norm: Tensor) -> Tensor:
        """The sync micro-batch, after clipping, before ``optimizer.step()``: the 0/1 float flag
        to pass as ``found_inf``, the same on every rank."""
        bad = (~torch.isfinite(self._step_loss) | ~torch.isfinite(grad_norm.detach())).float()
        if self.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # enqueued on the device, not waited for
        self._step_loss = torch.zeros_like(self._step_loss)
        flag = bad.to(torch.int64)
        self.total += flag
        self.consecutive = (self.consecutive + 1) * flag
        self.max_consecutive = torch.maximum(self.max_consecutive, self.consecutive)
        self._flags.append(flag)
        return bad

    def report(self, step: int) -> NonFiniteReport:
        """Host read-out (a sync point: log and checkpoint steps only). ``step`` is the last
        optimizer step taken; the flags since the previous report are those of the steps before."""
        flags = torch.stack(self._flags).tolist() if self._flags else []
        total, consecutive, max_consecutive = torch.stack(
            [self.total, self.consecutive, self.max_consecutive]).tolist()
        first = step - len(flags) + 1
        bad_steps = [first + i for i, f in enumerate(flags) if f]
        # Each event carries the count true at its own step, not the count at read-out time.
        totals_at = list(range(total - len(bad_steps) + 1, total + 1))
        self._flags.clear()
        self.max_consecutive = self.consecutive.clone()
        return NonFiniteReport(total, consecutive, max_consecutive, bad_steps, totals_at)

    def log_events_or_raise(self, step: int, loggers: Loggers, is_main: bool,
                            latest_checkpoint: Callable[[], str]) -> int:
        """:meth:`report` (a host sync), then one ``nonfinite_step`` event per skipped step at its own
        step and a warning line. Once ``limit`` steps were bad in a row the loggers are closed and
        TrainingError is raised. Returns the total of skipped steps so far."""
        report = self.report(step)
        for bad, total in zip(report.bad_steps, report.totals_at, strict=True):
            loggers.log({"nonfinite_step": 1, "nonfinite_steps": total}, step=bad)
            if is_main:
                print_event(nonfinite_warning(bad, report.total, self.limit))
        if report.max_consecutive >= self.limit:
            loggers.summary({"status": "failed: non-finite steps", "nonfinite_steps": report.total})
            loggers.close()
            raise nonfinite_stop_error(report.max_consecutive, self.limit, latest_checkpoint())
        return report.total

    def state_dict(self) -> dict[str, int]:
        total, consecutive = torch.stack([self.total, self.consecutive]).tolist()
        return {"nonfinite_steps": total, "consecutive_nonfinite_steps": consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.total.fill_(int(state.get("nonfinite_steps", 0)))
        self.consecutive.fill_(int(state.get("consecutive_nonfinite_steps", 0)))
        self.max_consecutive.copy_(self.consecutive)


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA OOM, and the CPU allocator's failure (a RuntimeError whose text says so)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def memory_figures(device: torch.device) -> dict[str, float]:
    """What was in use when memory ran out, in MB."""
    mb = 1024.0**2
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return {"gpu_total_mb": total / mb, "gpu_free_mb": free / mb,
                "torch_allocated_mb": torch.cuda.memory_allocated(device) / mb,
                "torch_reserved_mb": torch.cuda.memory_reserved(device) / mb,
                "torch_peak_mb": torch.cuda.max_memory_allocated(device) / mb}
    import psutil

    vm = psutil.virtual_memory()
    return {"rss_mb": psutil.Process().memory_info().rss / mb, "ram_total_mb": vm.total / mb,
            "ram_available_mb": vm.available / mb}


def print_event(line: str) -> None:
    print(f"mmtrain: {line}", file=sys.stderr, flush=True)


def nonfinite_warning(step: int, total: int, limit: int) -> str:
    return (f"warning: optimizer step {step}: non-finite loss or gradient; the update was skipped (weights and "
            f"optimizer state unchanged). {total} such step(s) so far; the run stops after {limit} in a row "
            "(train.max_nonfinite_steps).")


def nonfinite_stop_error(in_a_row: int, limit: int, latest_checkpoint: str) -> TrainingError:
    return TrainingError(
        f"{in_a_row} optimizer steps in a row had a non-finite loss or gradient (train.max_nonfinite_steps={limit}); "
        f"all of them were skipped, so no update was applied. The last checkpoint, {latest_checkpoint}, is intact. "
        "Lower optim.lr, set optim.max_grad_norm, use train.mixed_precision no or bf16, or check the data, then "
        "continue with --train.resume auto")


@dataclass
class OutOfMemory:
    """Where memory ran out, and what to log and tell the user about it."""

    device: torch.device
    rank: int | None          # None on a single process
    step: int                 # the last optimizer step completed
    in_validation: bool
    batch_size: int
    accumulation: int
    eval_batch_size: int

    def record(self, figures: dict[str, float]) -> dict[str, float]:
        """The logged event (at the step that did not complete; in validation: the next one)."""
        return {"out_of_memory": 1, "oom/batch_size": self.eval_batch_size if self.in_validation else self.batch_size,
                "oom/in_validation": int(self.in_validation), **{f"oom/{k}": v for k, v in figures.items()}}

    def error(self, error: BaseException, figures: dict[str, float], resume: str, latest: str) -> TrainingError:
        """The message names the flags that fix it, then the complete command that continues the run:
        the command line this process was started with, those flags replacing any it already had."""
        bs, accum, eval_bs = self.batch_size, self.accumulation, self.eval_batch_size
        # The smallest factor of the batch size splits it into equal micro-batches: the same
        # effective batch, which resume accepts as the same run.
        factor = next((f for f in range(2, bs + 1) if bs % f == 0), None)
        if self.in_validation:
            where = f"in the validation after optimizer step {self.step} with train.eval_batch_size={eval_bs}"
            flags = ["--train.eval_batch_size", str(eval_bs // 2)] if eval_bs > 1 else \
                ["--train.mixed_precision", "bf16"]
            fix = "Validate in smaller batches (the values do not depend on it): continue with the same command plus "
        elif factor is None:
            where = f"in optimizer step {self.step + 1} with train.batch_size=1"
            flags = ["--train.mixed_precision", "bf16"]
            fix = ("train.batch_size is already 1: use a smaller model or fewer processes per device, or continue "
                   "with the same command plus --train.mixed_precision bf16 (or fp16 on a GPU) ")
        else:
            where = f"in optimizer step {self.step + 1} with train.batch_size={bs}"
            flags = ["--train.batch_size", str(bs // factor),
                     "--train.gradient_accumulation_steps", str(accum * factor)]
            fix = "Keep the effective batch with smaller micro-batches: continue with the same command plus "
        flags += ["--train.resume", resume]
        if factor is not None or self.in_validation:
            fix += " ".join(shlex.quote(f) for f in flags[:-2]) + " "
        shown = ", ".join(f"{k} {v:.0f}" for k, v in figures.items())
        rank = f"rank {self.rank}, " if self.rank is not None else ""
        return TrainingError(
            f"out of memory ({rank}{self.device}) {where} per device [{shown} MB]. {fix}--train.resume {resume}. "
            f"The last checkpoint, {latest}, is intact. ({type(error).__name__}) {self.continue_command(flags)}")

    @staticmethod
    def continue_command(flags: list[str], argv: list[str] | None = None, env: Mapping[str, str] | None = None,
                         launcher: list[str] | None = None) -> str:
        """The sentence that ends the message, ``Continue with: <command>``: this process's command line
        (``argv``, default ``sys.argv``)
        with ``flags`` (``[--name, value, ...]``; ``--train.resume``'s value already shell-quoted)
        replacing the same options, in either form (``--name value`` or ``--name=value``). A worker of
        ``accelerate launch`` or ``torchrun`` cannot see its launcher's options in its own argv: the
        launcher's command line (``launcher``, default the parent process's) is used when it ends with
        this worker's arguments; on several nodes, or when it cannot be read, the message says to
        run the printed part under the same launcher."""
        argv = list(sys.argv if argv is None else argv)
        env = os.environ if env is None else env
        pairs = [(flags[i], flags[i + 1]) for i in range(0, len(flags), 2)]
        replaced = {name for name, _ in pairs}
        args, i = [], 1
        while i < len(argv):  # every option of `mmtrain train` takes one value (which may start with "-")
            word = argv[i]
            name, takes_value = word.split("=", 1)[0], word.startswith("--") and "=" not in word and word != "--"
            if name not in replaced:
                args += argv[i:i + 1 + takes_value]
            i += 1 + takes_value
        tail = " ".join([*(shlex.quote(a) for a in args),
                         *(f"{n} {v if n == '--train.resume' else shlex.quote(v)}" for n, v in pairs)])
        # A worker of torchrun / a multi-process accelerate launch has LOCAL_RANK; accelerate's
        # one-process launcher sets none, but exports its settings (ACCELERATE_MIXED_PRECISION...).
        launched = "LOCAL_RANK" in env or any(k.startswith("ACCELERATE_") for k in env)
        if not launched:  # started directly: python -m mmtrain, mmtrain, or a script
            return f"Continue with: {' '.join(OutOfMemory._program(argv[0]))} {tail}"
        if launcher is None:
            with contextlib.suppress(Exception):  # no parent to read: the fallback below
                import psutil

                launcher = psutil.Process().parent().cmdline()
        own = argv[1:]
        one_node = env.get("WORLD_SIZE", "1") == env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", "1"))
        if launcher and one_node and len(launcher) > len(own) and launcher[len(launcher) - len(own):] == own:
            words = launcher[:len(launcher) - len(own)]
            if len(words) >= 2 and Path(words[1]).name and shutil.which(Path(words[1]).name) == words[1]:
                words = [Path(words[1]).name, *words[2:]]  # `python .../bin/accelerate launch` as typed: accelerate
            return f"Continue with: {' '.join(shlex.quote(w) for w in words)} {tail}"
        program = "-m mmtrain" if Path(argv[0]).name == "__main__.py" else shell_word(argv[0])
        return f"Continue with the same launcher and its options (on every node), followed by: {program} {tail}"

    @staticmethod
    def _program(argv0: str) -> list[str]:
        """How the user started this process: ``python -m mmtrain``, ``mmtrain`` or ``python script.py``."""
        python = "python" if shutil.which("python") == sys.executable else sys.executable
        if Path(argv0).name == "__main__.py":
            return [shell_word(python), "-m", "mmtrain"]
        if argv0.endswith(".py"):
            return [shell_word(python), shell_word(argv0)]
        name = Path(argv0).name
        return [name if shutil.which(name) == os.path.abspath(argv0) else shell_word(argv0)]
