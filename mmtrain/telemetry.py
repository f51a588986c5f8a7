"""Training telemetry: what the loop measures, and when and how it becomes a logged record.

Owns the log window and the epoch window (:mod:`mmtrain.windows`), ``should_log``, the gradient
detail of a log step, the per-rank hardware readings, and building the training and epoch records.
At a log step every rank hands its columns, by name, to :func:`mmtrain.distributed.gather_named`
(one all-gather and one host copy, on every rank) and the records are built from the named rows
with plain Python (:func:`mmtrain.windows.combine`, :func:`gradient_detail`, :func:`hardware_record`).
"""

import math
import time
from collections.abc import Iterable, Iterator
from typing import Any

from accelerate import Accelerator
from torch import Tensor, nn

from mmtrain.config import Config
from mmtrain.distributed import Part, gather_named, is_sharded, local_grads
from mmtrain.hardware import HW_KEYS, HardwareMonitor
from mmtrain.metrics import (
    grad_stats,
    merge_grad_rows,
    sample_stats,
    summarize_grads,
)
from mmtrain.windows import Windows, combine, micro_batch_rows, step_row

# Per-rank readings: the hardware, then this rank's own timing of the window.
RANK_KEYS = (*HW_KEYS, "step_time", "data_wait_fraction")
# Logged once per epoch and charted against `epoch` (W&B define_metric).
EPOCH_METRICS = ("val/*", "epoch_train_loss_avg", "epoch_val_loss_avg", "val_train_loss_ratio",
                 "image_caption_loss_ratio", "gradient_norm_trend", "latent_std_trend")


def gradient_detail(rows: list[dict[str, dict[str, float]]], sharded: bool) -> dict[str, float]:
    """grad_mean/std/max and per-module norms of the log step, undoing that step's clip. The
    statistics were read after clipping: pre-clip = post-clip / clip coefficient (the same on
    every rank).

    ``sharded`` (FSDP): each rank's row describes its own shard of every gradient, so the rows are
    merged (sums and squared norms add, maxima take the max). Otherwise (DDP, one process) every
    rank holds the same full gradients and rank 0's row is the answer.
    """
    scale = 1.0 / rows[0]["grad"]["clip_coef"]
    if sharded:
        detail = merge_grad_rows([r["grad_detail"] for r in rows])
        module_sq = {name: sum(r["module_sq"][name] for r in rows) for name in rows[0]["module_sq"]}
    else:
        detail, module_sq = rows[0]["grad_detail"], rows[0]["module_sq"]
    out = summarize_grads(detail, scale)
    for name, sq in module_sq.items():
        out[f"grad_norm/{name}"] = scale * math.sqrt(max(sq, 0.0))
    return out


def hardware_record(rows: list[dict[str, dict[str, float]]]) -> dict[str, float]:
    """Per-rank ``hw/rank{r}/<key>``, ``hw/max/`` and ``hw/mean/`` across ranks, the main process's
    own readings under bare names, and the straggler ratios ``hw/imbalance_*`` (max/min over ranks).

    Readings a rank does not have (NaN: no GPU, no NVML) are left out rather than logged as 0.
    """
    record: dict[str, float] = {}
    per_key: dict[str, list[float]] = {}
    for rank, row in enumerate(rows):
        for key in RANK_KEYS:
            value = row["hw"][key]
            if math.isfinite(value):
                record[f"hw/rank{rank}/{key}"] = value
                per_key.setdefault(key, []).append(value)
                if rank == 0:
                    record[key] = value
    for key, values in per_key.items():
        record[f"hw/max/{key}"] = max(values)
        record[f"hw/mean/{key}"] = sum(values) / len(values)
    peak = per_key.get("torch_peak_mb") or per_key.get("peak_rss_mb") or []
    for name, values in (("peak_memory", peak), ("step_time", per_key.get("step_time", []))):
        if len(values) == len(rows) and min(values) > 0:
            record[f"hw/imbalance_{name}"] = max(values) / min(values)
    return record


class Telemetry:
    """Measures every micro-batch and optimizer step on device and builds the logged records.

    ``state_dict`` holds the last training and epoch records (shared by all ranks, for the final
    summary of a resumed run); :attr:`windows` is the per-rank state.
    """

    def __init__(self, accelerator: Accelerator, model: nn.Module, optimizer: Any, cfg: Config,
                 steps_per_epoch: int, total_steps: int) -> None:
        self.accelerator, self.optimizer, self.cfg = accelerator, optimizer, cfg
        self.enabled = cfg.wandb.telemetry
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.max_grad_norm = cfg.optim.max_grad_norm or math.inf  # inf: measure the norm, never clip
        self.windows = Windows(accelerator.device)
        self.hardware = HardwareMonitor(accelerator.device)
        self.module_params = {name: list(child.parameters()) for name, child in model.named_children()}
        self.grad_detail: dict[str, Part] = {}
        self.last_train: dict[str, float] = {}
        self.last_val: dict[str, float] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"last_train": self.last_train, "last_val": self.last_val}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_train, self.last_val = state.get("last_train", {}), state.get("last_val", {})

    def at_log_frequency(self, step: int) -> bool:
        """Every ``wandb.log_frequency`` steps and the last step: where host read-outs may happen."""
        return step % self.cfg.wandb.log_frequency == 0 or step == self.total_steps

    def should_log(self, step: int) -> bool:
        """Is optimizer step ``step`` a log step (the only steps whose window values reach the host)?"""
        return self.enabled and self.at_log_frequency(step)

    def media_due(self, step: int) -> bool:
        """A reconstruction grid is logged at this step (decided from the config alone, so every
        rank agrees on which steps read the host)."""
        every = self.cfg.wandb.image_log_frequency
        return bool(every) and step % every == 0

    def timed(self, loader: Iterable[dict]) -> Iterator[dict]:
        """Iterate ``loader``, adding the time spent waiting for each batch to the log window."""
        iterator = iter(loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.windows.log.data_wait += time.perf_counter() - start
            yield batch

    def on_micro_batch(self, batch: dict[str, Tensor], losses: dict[str, Tensor], outputs: dict[str, Tensor],
                       step: int, closes_epoch: bool) -> None:
        """Add a micro-batch of optimizer step ``step`` to both windows, on device; ``closes_epoch``:
        that step is the epoch's last. Its sample metrics go to the log window when the step is a log
        step, and to the epoch window then or when it closes the epoch (``wandb.sample_metrics``
        ``log_steps``), or always (``every_step``)."""
        to_log = to_epoch = False
        if self.enabled:
            # Decided from the config and the step alone, so every rank computes the same rows.
            to_log = self.cfg.wandb.sample_metrics == "every_step" or self.at_log_frequency(step)
            to_epoch = to_log or closes_epoch
        stats = None
        if to_epoch:
            # On every micro-batch these ~45 small ops cost ~0.4 ms of a 55 ms CPU laptop step
            # (dispatch, not arithmetic); on log steps only, a tenth of that.
            stats = sample_stats(batch["pixel_values"], outputs["reconstruction"], outputs["latent"],
                                 outputs["logits"], batch["input_ids"], batch["attention_mask"])
        loss_row, batch_size, sums, maxes = micro_batch_rows(losses, batch["pixel_values"].shape[0], stats)
        self.windows.log.add_rows(loss_row, batch_size, *((sums, maxes) if to_log else (None, None)))
        self.windows.epoch.add_rows(loss_row, batch_size, sums, maxes)

    def on_optimizer_step(self, grad_norm: Tensor, step: int) -> None:
        """The sync micro-batch of optimizer step ``step``, after clipping, before the update."""
        row = step_row(grad_norm, self.max_grad_norm)
        self.windows.log.add_step_row(row)
        self.windows.epoch.add_step_row(row)
        if self.should_log(step):
            # Read after clipping (accelerate unscales fp16 grads inside clip_grad_norm_ and a second
            # unscale is an error); the record divides by this step's clip coefficient.
            # Under FSDP each rank reads its own shard; gradient_detail merges the ranks' rows.
            grads = {name: local_grads(params) for name, params in self.module_params.items()}
            total, per_module = grad_stats(grads)
            self.grad_detail = {"grad_detail": total, "module_sq": per_module}

    def on_skipped_step(self) -> None:
        """An fp16 overflow step: the scaler skipped the update."""
        self.windows.log.skipped_steps += 1

    def gather_log_record(self, step: int, samples_seen: int, lrs: list[float]) -> dict[str, Any]:
        """Collective (every rank): the training record of the log window ending at ``step``;
        ``lrs`` are the learning rates that step ran with. Resets the log window."""
        acc, cfg, window = self.accelerator, self.cfg, self.windows.log
        columns = window.columns()
        elapsed, steps = columns["counts"]["elapsed"], max(window.optimizer_steps, 1)
        own = {**self.hardware.read(), "step_time": elapsed / steps,
               "data_wait_fraction": window.data_wait / elapsed if elapsed > 0 else 0.0}
        rows = gather_named(acc, {**columns, **self.grad_detail, "hw": own})
        samples = sum(r["counts"]["samples"] for r in rows)
        groups = [g.get("name", i) for i, g in enumerate(self.optimizer.param_groups)]
        record = {
            **combine(rows),
            **(gradient_detail(rows, is_sharded(acc)) if self.grad_detail else {}),
            "learning_rate": lrs[0],
            **{f"learning_rate/{g}": lr for g, lr in zip(groups, lrs, strict=True)},
            "epoch": step / self.steps_per_epoch,
            "batch_size": cfg.train.batch_size,
            "effective_batch_size": cfg.train.batch_size * acc.num_processes * cfg.train.gradient_accumulation_steps,
            "optimizer_step": step,
            "total_optimizer_steps": self.total_steps,  # the schedule's length, which a resume may change
            "samples_seen": samples_seen,
            "samples_per_second": samples / rows[0]["counts"]["elapsed"] if rows[0]["counts"]["elapsed"] > 0 else 0.0,
            **hardware_record(rows),
        }
        if acc.scaler is not None:  # fp16: the loss scale, and the steps it skipped on overflow
            record["loss_scale"] = acc.scaler.get_scale()
            record["skipped_steps"] = rows[0]["counts"]["skipped_steps"]
        self.last_train = record
        window.reset()
        return record

    def gather_epoch_record(self, val: dict[str, float], step: int) -> dict[str, float]:
        """Collective (every rank): the epoch summary, from the epoch window (training means over
        the epoch so far) and ``val``, the evaluator's ``val/*`` results."""
        train = combine(gather_named(self.accelerator, self.windows.epoch.columns()))
        record = {
            **val,
            "epoch": step / self.steps_per_epoch,
            "epoch_train_loss_avg": train["total_loss"],
            "epoch_val_loss_avg": val["val/total_loss"],
            "val_train_loss_ratio": val["val/total_loss"] / train["total_loss"],
            "image_caption_loss_ratio": train["loss_image"] / train["loss_caption"],
            "gradient_norm_trend": train["grad_norm"],
        }
        if "latent_std" in train:
            record["latent_std_trend"] = train["latent_std"]
        self.last_val = record
        return record
