"""A run's output folder: what counts as a run there, whether a checkpoint belongs to this run, how
the folder is prepared before training writes into it (metrics.jsonl cut back on resume), and
what the run says about itself: the run config every logger records and the final report."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from mmtrain.checkpoint import CheckpointManager, TrainState, read_train_state
from mmtrain.config import Config, read_yaml
from mmtrain.distributed import print_main
from mmtrain.errors import CheckpointError, ConfigError, shell_word
from mmtrain.fsio import write_atomic
from mmtrain.model import loss_names

# Files a previous run leaves in output_dir; their presence means "this folder holds a run".
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "model", "wandb", "media", "tensorboard",
               "metrics.csv")

# Config fields a resumed run must share with its checkpoint, or it would not be the same run:
# they fix the model, the data and its order. What one optimizer step is (the effective batch) is
# checked apart: its split into per-device batch x processes x accumulation may change (the OOM
# remedy, or a job moved to fewer or more GPUs).
SAME_RUN_FIELDS = ("model.", "data.", "train.seed")
BATCH_SPLIT = ("train.batch_size", "train.gradient_accumulation_steps")
# Fields under model. and data. that change neither the model nor the samples or their order:
# data loading logistics (workers, caches), and which negatives the alignment loss sees (an accepted batch split or
# process count changes those too; absent, as None, from checkpoints written before the field).
NOT_RUN_DEFINING = ("data.num_workers", "data.cache_dir", "data.decode_cache", "model.global_alignment")


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{k}": v for section, values in config.items() for k, v in (values or {}).items()}


def for_sweep_agent(cfg: Config) -> Config:
    """``cfg``, or under ``wandb agent`` (WANDB_SWEEP_ID and WANDB_RUN_ID set, the same on every rank) ``cfg``
    with ``train.output_dir`` = ``<train.output_dir>/<WANDB_RUN_ID>``: each run the agent starts has its own
    folder, so the second one is not refused as "already holds a run", and a run the agent gives again (same
    id) finds its own checkpoints."""
    run_id = os.environ.get("WANDB_RUN_ID", "")
    if not os.environ.get("WANDB_SWEEP_ID") or run_id in ("", ".", "..") or "/" in run_id or os.sep in run_id:
        return cfg
    train = dataclasses.replace(cfg.train, output_dir=str(Path(cfg.train.output_dir) / run_id))
    return dataclasses.replace(cfg, train=train)


@dataclass(frozen=True)
class SavedLayout:
    """How a checkpoint's run split its effective batch: what its data position is counted in."""

    batch_size: int  # train.batch_size, per device
    processes: int   # the world size that wrote it


def config_differences(saved: dict[str, Any], current: Config, processes: int = 1,
                       saved_processes: int | None = None, effective_batch: bool = True) -> tuple[list[str], list[str]]:
    """(fields that make it a different run, other changed fields), as ``name: saved -> now``.

    A new split of the same effective batch (per-device batch x processes x accumulation, with
    ``saved_processes`` on the saved side, default ``processes``, and ``processes`` now) is the same
    run, whatever the number of processes; a different effective batch is not, and the line shows
    the arithmetic of both sides. ``effective_batch=False`` leaves it out: a run with no checkpoint
    yet has no data position to convert, so it may start over with another one."""
    saved_processes = processes if saved_processes is None else saved_processes
    old, new = _flatten(saved), _flatten(current.to_dict())
    blocking, other = [], []
    for key in sorted(set(old) | set(new)):
        if key.startswith(("train.resume", "train.overwrite", "train.progress_bar", "train.output_dir")):
            continue
        if old.get(key) != new.get(key):
            line = f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
            same_run = key.startswith(SAME_RUN_FIELDS) and key not in NOT_RUN_DEFINING
            (blocking if same_run else other).append(line)
    (bs_old, accum_old), (bs_new, accum_new) = ([int(flat.get(k) or 1) for k in BATCH_SPLIT] for flat in (old, new))
    if effective_batch and bs_old * saved_processes * accum_old != bs_new * processes * accum_new:
        def effective(bs: int, world: int, accum: int) -> str:
            return f"{bs} x {world} x {accum} = {bs * world * accum}"

        blocking.append(f"effective batch (train.batch_size x processes x train.gradient_accumulation_steps): "
                        f"{effective(bs_old, saved_processes, accum_old)} -> {effective(bs_new, processes, accum_new)}")
    return blocking, other


def check_same_run(acc: Accelerator, path: Path, cfg: Config) -> SavedLayout:
    """Refuse (CheckpointError) a checkpoint at ``path`` that belongs to a different run; list other
    changed settings. Another split of the same effective batch, over any number of processes, is
    the same run. Returns the checkpoint's layout, to convert its data position."""
    saved = read_yaml(path / "config.yaml")
    saved_processes = int(read_train_state(path).get("world_size") or 1)
    blocking, other = config_differences(saved, cfg, acc.num_processes, saved_processes)
    if blocking:
        raise CheckpointError(
            f"train.resume: {path} belongs to a different run; these fields differ (checkpoint -> now): "
            f"{'; '.join(blocking)}. Resume with the checkpoint's config "
            f"(--config {shell_word(path / 'config.yaml')}), "
            "or start a new run with another --train.output_dir (or --train.resume none --train.overwrite true)")
    if saved_processes != acc.num_processes:
        other.append(f"processes: {saved_processes} -> {acc.num_processes}")
    if other:
        print_main(acc, f"mmtrain: resuming {path} with changed settings: {'; '.join(other)}")
    return SavedLayout(int(saved.get("train", {}).get("batch_size") or cfg.train.batch_size), saved_processes)


def keep_metrics_until(path: Path, last_step: int) -> int:
    """Resuming from the checkpoint of ``last_step``: drop the lines the interrupted run wrote for
    later steps (they are trained again), and a line torn by the kill. Returns the lines dropped.
    Rewritten atomically, so a crash here loses nothing."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            dropped += 1
            continue
        if step <= last_step:
            kept.append(line)
        else:
            dropped += 1
    write_atomic(path, "".join(f"{line}\n" for line in kept))
    return dropped


def prepare_output_dir(acc: Accelerator, out: Path, cfg: Config, resume_from: Path | None, resumed_step: int,
                       checkpointer: CheckpointManager) -> None:
    """Collective. Make ``out`` this run's folder, or raise ConfigError before changing anything.

    Resuming from ``out``'s own checkpoint keeps its files and cuts metrics.jsonl back to
    ``resumed_step``. A folder holding the same run with no checkpoint yet (it died before its first
    save) starts over, keeping its W&B folders. Any other run there is refused unless
    ``train.overwrite``. Then the main rank writes the resolved config.yaml."""
    existing = [name for name in RUN_OUTPUTS if (out / name).exists()]
    resuming_here = resume_from is not None and resume_from.parent == out / "checkpoints"
    if resuming_here:
        existing = []  # this run's own files: kept, and metrics.jsonl is cut back to the checkpoint
        if acc.is_main_process:
            dropped = keep_metrics_until(out / "metrics.jsonl", resumed_step)
            print_main(acc, f"mmtrain: {dropped} metrics.jsonl line(s) after the checkpoint will be trained again")
    elif existing and (cfg.train.resume == "auto" or resume_from is not None) and \
            not checkpointer.complete() and (out / "config.yaml").is_file() and \
            not config_differences(read_yaml(out / "config.yaml"), cfg, effective_batch=False)[0]:
        # No checkpoint here yet: the same run died before its first save. Start it over (from the
        # checkpoint it was continuing, if any), keeping its W&B files (a record of the attempt).
        existing = [name for name in existing if name != "wandb"]
    elif existing and not cfg.train.overwrite:
        raise ConfigError(f"train.output_dir={str(out)!r} already holds a run ({', '.join(existing)}); "
                          "choose another --train.output_dir, continue it with --train.resume auto, or pass "
                          "--train.overwrite true to replace it")
    acc.wait_for_everyone()  # every rank has looked before the main rank changes anything
    if acc.is_main_process:
        for name in existing:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "config.yaml", cfg.to_yaml())
    acc.wait_for_everyone()


def run_config(cfg: Config, derived: dict[str, Any]) -> dict[str, Any]:
    """The resolved config, the ``derived`` values (world size, sample counts, steps...), and the
    guide's flat names for easy charting: what every logger records as the run's config."""
    return {
        **cfg.to_dict(),
        **derived,
        "batch_size": cfg.train.batch_size,
        "learning_rate": cfg.optim.lr,
        "weight_decay": cfg.optim.weight_decay,
        "epochs": cfg.train.epochs,
        "latent_dim": cfg.model.latent_dim,
        "embedding_dim": cfg.model.embedding_dim,
        "image_encoder_layers": cfg.model.image_encoder_layers,
        "transformer_layers": cfg.model.transformer_layers,
        "image_loss_weight": cfg.model.image_loss_weight,
        "caption_loss_weight": cfg.model.caption_loss_weight,
        "alignment_loss_weight": cfg.model.alignment_loss_weight,
        "optimizer": "AdamW",
        "scheduler": "CosineAnnealing with linear warmup",
    }


def final_report(out: Path, summary: dict[str, Any], last_train: dict[str, float], last_val: dict[str, float],
                 checkpoint: Path, model_dir: Path, logger_lines: list[str]) -> list[str]:
    """The lines printed when training finishes: totals, final losses, and where everything is."""
    lines = ["", "== mmtrain: training finished ==",
             f"steps {summary['optimizer_steps']}  samples {summary['samples_seen']}  "
             f"time {summary['train_time_seconds']:.1f}s  ({summary['samples_per_second']:.1f} samples/s)"]
    if last_train:
        lines.append("final train window: " + "  ".join(f"{k} {last_train[k]:.4f}" for k in loss_names()))
    if last_val:
        lines.append("final validation:   " + "  ".join(f"{k} {last_val['val/' + k]:.4f}" for k in loss_names()))
    lines.append(f"best validation total_loss {summary['best_validation_loss']:.4f} "
                 f"(epoch {summary['best_validation_epoch']})")
    return [*lines, f"metrics:    {out / 'metrics.jsonl'}", f"checkpoint: {checkpoint}",
            f"model:      {model_dir}  (MultimodalModel.from_pretrained)", *logger_lines]


def run_summary(state: TrainState, train_time: float, total_parameters: int, last_train: dict[str, float],
                last_val: dict[str, float]) -> dict[str, Any]:
    """The run's summary (summary.json, the W&B summary, the model card's results)."""
    return {
        "final_validation_loss": last_val.get("val/total_loss"),
        "best_validation_loss": state.best_val_loss,
        "best_validation_epoch": state.best_val_epoch,
        "final_train_loss": last_train.get("total_loss"),
        "total_parameters": total_parameters,
        "optimizer_steps": state.optimizer_step,
        "samples_seen": state.samples_seen,
        "nonfinite_steps": state.nonfinite_steps,
        "train_time_seconds": train_time,
        "samples_per_second": state.samples_seen / train_time if train_time > 0 else 0.0,
    }
