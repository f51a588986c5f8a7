"""`mmtrain train`, with faults injected at exact moments (for tests/test_resume.py only).

    python tests/fault_run.py [mmtrain train arguments]

MMTRAIN_KILL="<moment>:<step>[:<rank>]" sends SIGKILL to this process at that moment:
  after_step:N    at optimizer step N's boundary, after any checkpoint due there was saved
  after_save:N    right after checkpoint N is committed (e.g. an epoch-end save)
  save_write:N    inside the save of step N: the per-rank files are written, the shared ones not
  save_commit:N   inside the save of step N: everything written, train_state.json too, not yet renamed
MMTRAIN_NAN="N,M,...[:<rank>]" makes the loss NaN in those optimizer steps (1-based).
MMTRAIN_PIDFILE=DIR writes DIR/rank<r>.pid, so a test can signal each rank.
MMTRAIN_OOM="N[:<rank>]" raises torch.OutOfMemoryError in the forward pass of optimizer step N (1-based).
MMTRAIN_THREADS_AT_EXIT=DIR writes DIR/rank<r>.txt, the names of this process's threads when interpreter
  shutdown starts (atexit): the process group's threads must be gone by then.
MMTRAIN_SAMPLES=DIR appends, per trained micro-batch, {"step", "epoch", "samples": [sample key...]} to
  DIR/rank<r>-<pid>.jsonl (a sample's key: a hash of its pixels and caption ids, what the model saw).
"""

import contextlib
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import mmtrain.checkpoint as checkpoint
from mmtrain import cli
from mmtrain.model import MultimodalModel
from mmtrain.telemetry import Telemetry
from mmtrain.trainer import Trainer

RANK = int(os.environ.get("RANK", "0"))


def _spec(name: str) -> tuple[str, set[int]] | None:
    value = os.environ.get(name)
    if not value:
        return None
    parts = value.split(":")
    if parts[-1].isdigit() and len(parts) == (3 if name == "MMTRAIN_KILL" else 2) and int(parts[-1]) != RANK:
        return None
    return parts[0] if name == "MMTRAIN_KILL" else "", {int(s) for s in parts[1 if name == "MMTRAIN_KILL" else 0]
                                                        .split(",")}


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


trainer: list[Trainer] = []
original_init = Trainer.__init__


def init(self, cfg):
    trainer.append(self)
    original_init(self, cfg)


Trainer.__init__ = init

kill = _spec("MMTRAIN_KILL")
if kill:
    moment, steps = kill

    def step() -> int:
        return trainer[0].state.optimizer_step

    if moment == "after_step":
        at_step_end = Trainer.log_and_save_at_step_end

        def log_and_save_at_step_end(self, lrs, epoch_ends):
            stop = at_step_end(self, lrs, epoch_ends)
            if step() in steps:
                _die()
            return stop

        Trainer.log_and_save_at_step_end = log_and_save_at_step_end
    elif moment == "after_save":
        save = checkpoint.CheckpointManager.save

        def save_and_die(self, at):
            path = save(self, at)
            if at in steps:
                _die()
            return path

        checkpoint.CheckpointManager.save = save_and_die
    elif moment == "save_write":
        write_shared = checkpoint.CheckpointManager.write_shared

        def die_writing(self, tmp):
            if step() in steps:
                _die()
            write_shared(self, tmp)

        checkpoint.CheckpointManager.write_shared = die_writing
    elif moment == "save_commit":
        replace_dir = checkpoint.replace_dir

        def _replace_dir(tmp, final):
            if step() in steps:
                _die()
            replace_dir(tmp, final)

        checkpoint.replace_dir = _replace_dir
    else:
        raise SystemExit(f"unknown MMTRAIN_KILL moment {moment!r}")

nan = _spec("MMTRAIN_NAN")
if nan:
    _, nan_steps = nan
    forward = MultimodalModel.forward

    def poisoned(self, batch):
        losses, outputs = forward(self, batch)
        if self.training and trainer[0].state.optimizer_step + 1 in nan_steps:
            losses["total_loss"] = losses["total_loss"] * float("nan")
        return losses, outputs

    MultimodalModel.forward = poisoned

oom = _spec("MMTRAIN_OOM")
if oom:
    import torch

    _, oom_steps = oom
    unpoisoned = MultimodalModel.forward

    def out_of_memory(self, batch):
        if self.training and trainer[0].state.optimizer_step + 1 in oom_steps:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by fault_run.py)")
        return unpoisoned(self, batch)

    MultimodalModel.forward = out_of_memory

if os.environ.get("MMTRAIN_SAMPLES"):
    samples_file = Path(os.environ["MMTRAIN_SAMPLES"], f"rank{RANK}-{os.getpid()}.jsonl")
    on_micro_batch = Telemetry.on_micro_batch

    def record_samples(self, batch, losses, outputs, *args, **kwargs):
        keys = [hashlib.sha256(pixels.cpu().numpy().tobytes() + ids.cpu().numpy().tobytes()).hexdigest()[:16]
                for pixels, ids in zip(batch["pixel_values"], batch["input_ids"], strict=True)]
        state = trainer[0].state
        with samples_file.open("a") as f:  # a line per micro-batch, on disk before a kill can come
            f.write(json.dumps({"step": state.optimizer_step + 1, "epoch": state.epoch, "samples": keys}) + "\n")
        return on_micro_batch(self, batch, losses, outputs, *args, **kwargs)

    Telemetry.on_micro_batch = record_samples

if os.environ.get("MMTRAIN_THREADS_AT_EXIT"):
    import atexit

    def _write_threads() -> None:  # registered first, so it runs after every other atexit hook
        names = []
        for task in Path("/proc/self/task").iterdir():
            with contextlib.suppress(OSError):  # a thread that ended since the listing
                names.append(Path(task, "comm").read_text().strip())
        Path(os.environ["MMTRAIN_THREADS_AT_EXIT"], f"rank{RANK}.txt").write_text("\n".join(sorted(names)))

    atexit.register(_write_threads)

if os.environ.get("MMTRAIN_PIDFILE"):
    Path(os.environ["MMTRAIN_PIDFILE"], f"rank{RANK}.pid").write_text(str(os.getpid()))

sys.exit(cli.main(["train", *sys.argv[1:]]))
