"""The training loop on Accelerate. Read ``Trainer.fit`` top to bottom: that is the whole run.

Data flow of one optimizer step: batch -> ``model(batch)`` -> ``(losses, outputs)`` ->
``accelerator.backward`` inside ``accelerator.accumulate`` -> on the sync micro-batch:
``clip_grad_norm_`` (pre-clip norm kept on device) -> non-finite guard (on device) -> optimizer
and scheduler step -> on a log step only: one reduce + one gather + one host copy, then
``tracker.log`` (main process only) -> at the step boundary: the ranks agree on stop/save flags
(host only) and a checkpoint is written when one is due.
"""

import contextlib
import dataclasses
import math
import re
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import skip_first_batches
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from mmtrain.checkpoint import Checkpointer, TrainingObjects, export_model, model_card, restore_rng
from mmtrain.config import Config
from mmtrain.data import build_dataloader, fixed_batch, load_splits
from mmtrain.distributed import build_accelerator, print_main
from mmtrain.errors import CheckpointError, ConfigError, DataError, TrainingError, shell_word
from mmtrain.hardware import HardwareMonitor
from mmtrain.media import MediaLogger, NullMediaLogger
from mmtrain.metrics import MAX_FIELDS, SUM_FIELDS, grad_stats, retrieval_recall, sample_stats, summarize
from mmtrain.model import LOSS_NAMES, MultimodalModel, eval_alignment, weighted_total
from mmtrain.optim import build_optimizer, build_scheduler, optimizer_steps
from mmtrain.resilience import (
    NonFiniteGuard,
    StepAgreement,
    StopSignals,
    is_out_of_memory,
    memory_figures,
    print_event,
    requeue_slurm_job,
)
from mmtrain.run_dir import check_same_run, prepare_output_dir
from mmtrain.telemetry import Window, combine, gather_rows, gradient_detail, hardware_record
from mmtrain.tokenizer import build_tokenizer, load_tokenizer
from mmtrain.tracking import build_tracker

# Logged once per epoch and charted against `epoch` (W&B define_metric).
EPOCH_METRICS = ["val/*", "epoch_train_loss_avg", "epoch_val_loss_avg", "val_train_loss_ratio",
                 "image_caption_loss_ratio", "gradient_norm_trend", "latent_std_trend"]

@dataclasses.dataclass
class TrainState:
    """Everything about the run's progress that a checkpoint must carry (train_state.json)."""

    optimizer_step: int = 0
    epoch: int = 0                 # epochs completed
    batches_in_epoch: int = 0      # micro-batches of epoch `epoch` already trained on, per rank
    samples_seen: int = 0
    best_val_loss: float = math.inf
    best_val_epoch: int = -1
    nonfinite_steps: int = 0
    consecutive_nonfinite_steps: int = 0
    train_time_seconds: float = 0.0
    wandb_run_id: str | None = None


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.accelerator = build_accelerator(cfg.train)
        self.output_dir = Path(cfg.train.output_dir).expanduser()
        self.state = TrainState()
        self.started = time.perf_counter()  # fit() restarts it; set here so a bare train_epoch can save
        self.validating = False
        set_seed(cfg.train.seed)
        self.checkpointer = Checkpointer(self.accelerator, self.output_dir / "checkpoints", cfg.checkpoint.keep_last)
        self.resume_from = self.checkpointer.find_resume(cfg.train.resume)
        if self.resume_from is not None:
            self.resume_batch_size = check_same_run(self.accelerator, self.resume_from, cfg)
        # Everything the user gave us is validated before output_dir is touched, so a bad input
        # never costs an earlier run its files.
        self._build_data()
        self._build_model()
        self._build_optimization()
        self._build_guards()
        self.last_train: dict[str, float] = {}
        self.last_val: dict[str, float] = {}
        rank_state = self._restore(self.resume_from) if self.resume_from is not None else None
        prepare_output_dir(self.accelerator, self.output_dir, cfg, self.resume_from, self.state.optimizer_step,
                           self.checkpointer)
        self._build_telemetry()
        if rank_state is not None:
            # Last, so that nothing set-up does (W&B, media) moves the RNG streams the steps use.
            restore_rng(rank_state["rng"])
        self.progress = tqdm(total=self.total_steps, initial=self.state.optimizer_step, desc="train", unit="step",
                             disable=not (self.accelerator.is_main_process and cfg.train.progress_bar),
                             dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 10.0)  # short job logs

    def _build_telemetry(self) -> None:
        acc, cfg = self.accelerator, self.cfg
        self.telemetry = cfg.wandb.telemetry
        self.hardware = HardwareMonitor(acc.device)
        self.grad_detail = torch.zeros(0)
        model = acc.unwrap_model(self.model)
        self.module_params = {name: list(child.parameters()) for name, child in model.named_children()}
        self.tracker = build_tracker(acc.is_main_process, self.output_dir, cfg.wandb, self.run_config(),
                                     run_id=self.state.wandb_run_id)
        self.state.wandb_run_id = self.tracker.run_id or self.state.wandb_run_id
        self.tracker.define_epoch_metrics(EPOCH_METRICS)
        self.media = NullMediaLogger()
        if acc.is_main_process and cfg.wandb.media_samples > 0:
            batch = fixed_batch(self.val_dataset, self.tokenizer, cfg.model, cfg.wandb.media_samples)
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            self.media = MediaLogger(model, batch, self.tokenizer, self.tracker, acc.autocast)

    def _build_guards(self) -> None:
        acc = self.accelerator
        self.window, self.epoch_window = Window(acc.device), Window(acc.device)
        self.guard = NonFiniteGuard(acc.device, acc.num_processes)
        self.agreement = StepAgreement(acc.num_processes)
        self.signals = StopSignals()
        self.last_saved_step = -1
        self.last_save_time = time.monotonic()

    # ----------------------------------------------------------------------------------- building

    def _build_data(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        # The main rank draws/caches the synthetic set or downloads first; the others then read it.
        with acc.main_process_first():
            splits = load_splits(cfg.data, cfg.model)
        train_ds, val_ds = splits
        self.skipped_samples = len(splits.skipped)  # data.skip_bad_samples: reported in the run config
        global_batch = cfg.train.batch_size * acc.num_processes
        if len(train_ds) < global_batch:
            raise DataError(f"the training split has {len(train_ds)} samples, fewer than one global batch "
                            f"(train.batch_size={cfg.train.batch_size} x {acc.num_processes} processes); "
                            "lower train.batch_size or add data")
        if self.resume_from is not None:  # the vocabulary the checkpoint's embedding rows belong to
            self.tokenizer = load_tokenizer(self.resume_from / "tokenizer")
        else:
            self.tokenizer = build_tokenizer(train_ds["caption"], cfg.model.max_caption_length,
                                             cfg.data.min_word_frequency)
        self.train_samples, self.val_samples = len(train_ds), len(val_ds)
        self.val_dataset = val_ds
        pin = acc.device.type == "cuda"
        eval_bs = cfg.train.eval_batch_size or cfg.train.batch_size
        self.train_loader = build_dataloader(train_ds, self.tokenizer, cfg.model, cfg.train.batch_size,
                                             cfg.data.num_workers, shuffle=True, seed=cfg.train.seed, pin_memory=pin)
        self.val_loader = build_dataloader(val_ds, self.tokenizer, cfg.model, eval_bs, cfg.data.num_workers,
                                           shuffle=False, seed=cfg.train.seed, pin_memory=pin)

    def _build_model(self) -> None:
        vocab = len(self.tokenizer)
        if self.cfg.model.vocab_size not in (0, vocab):
            raise ConfigError(f"model.vocab_size={self.cfg.model.vocab_size} but the tokenizer built from the "
                              f"training captions has {vocab} tokens; leave model.vocab_size at 0")
        self.model_config = dataclasses.replace(self.cfg.model, vocab_size=vocab)
        self.model = MultimodalModel(self.model_config)
        self.total_parameters = self.model.num_parameters()

    def _build_optimization(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        optimizer = build_optimizer(self.model, cfg.optim)
        self.model, self.optimizer, self.train_loader, self.val_loader = acc.prepare(
            self.model, optimizer, self.train_loader, self.val_loader)
        # Sized from the sharded loader, so it is right for any process count and accumulation.
        self.steps_per_epoch, self.total_steps = optimizer_steps(
            len(self.train_loader), cfg.train.gradient_accumulation_steps, cfg.train.epochs, cfg.train.max_steps)
        # Not prepared: a prepared scheduler steps once per process per optimizer step.
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.total_steps)
        self.max_grad_norm = cfg.optim.max_grad_norm or math.inf  # inf: measure the norm, never clip

    def training_objects(self) -> TrainingObjects:
        return TrainingObjects(self.accelerator.unwrap_model(self.model), self.optimizer, self.scheduler,
                               self.accelerator.scaler, self.tokenizer, self.cfg)

    def _restore(self, path: Path) -> dict[str, Any]:
        """Load the checkpoint into the prepared objects; the run continues exactly where it was."""
        meta, rank = self.checkpointer.load(path, self.training_objects(), self.accelerator.device)
        fields = {f.name for f in dataclasses.fields(TrainState)}
        self.state = TrainState(**{k: v for k, v in meta.items() if k in fields})
        self.last_train, self.last_val = meta.get("last_train", {}), meta.get("last_val", {})
        self.guard.load_state_dict(meta)
        self.window.load_state_dict(rank["window"])
        self.epoch_window.load_state_dict(rank["epoch_window"])
        self.last_saved_step = self.state.optimizer_step
        self.state.batches_in_epoch = self._data_position(self.state.batches_in_epoch, path)
        state = self.state
        print_main(self.accelerator, f"mmtrain: resuming from {path} (optimizer step {state.optimizer_step}, "
                   f"epoch {state.epoch} + {state.batches_in_epoch} batches)")
        return rank

    def _data_position(self, batches: int, path: Path) -> int:
        """The checkpoint's position in the epoch (micro-batches of its per-device batch size) in
        micro-batches of this run's. The seedable sampler orders samples independently of the batch
        size, so a position of ``batches * old`` samples per rank is the same point in the epoch."""
        old, new = self.resume_batch_size, self.cfg.train.batch_size
        if old == new or batches == 0:
            return batches
        old_epoch = math.ceil(self.train_samples / (old * self.accelerator.num_processes))
        if batches >= old_epoch:  # saved after the epoch's last step, before its end-of-epoch work
            return len(self.train_loader)
        if batches * old % new:
            raise CheckpointError(f"{path}: its data position ({batches} batches of {old} per device) is not a "
                                  f"whole number of batches of train.batch_size={new}; resume with "
                                  f"--train.batch_size {old}, or from a checkpoint taken at an epoch end")
        return batches * old // new

    def run_config(self) -> dict[str, Any]:
        """The resolved config plus derived values, and the guide's flat names for easy charting."""
        cfg, acc = self.cfg, self.accelerator
        per_device = cfg.train.batch_size
        return {
            **cfg.to_dict(),
            "world_size": acc.num_processes,
            "device": acc.device.type,
            "mixed_precision": acc.mixed_precision,
            "per_device_batch_size": per_device,
            "effective_batch_size": per_device * acc.num_processes * cfg.train.gradient_accumulation_steps,
            "train_samples": self.train_samples,
            "val_samples": self.val_samples,
            "skipped_bad_samples": self.skipped_samples,
            "vocab_size": self.model_config.vocab_size,
            "total_parameters": self.total_parameters,
            "steps_per_epoch": self.steps_per_epoch,
            "total_optimizer_steps": self.total_steps,
            "batch_size": per_device,
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

    # ------------------------------------------------------------------------------------ the run

    def fit(self) -> dict[str, Any]:
        state, cfg = self.state, self.cfg
        self.started = time.perf_counter()
        self.signals.install()
        try:
            for epoch in range(state.epoch, cfg.train.epochs):
                if state.optimizer_step >= self.total_steps:
                    break
                if self.train_epoch(epoch):
                    return self.stop_on_signal()
                # A max_steps cut validates where it stopped but leaves the epoch open: a run continued
                # without the cap finishes this epoch instead of skipping the rest of it.
                self.end_epoch(epoch, complete=state.batches_in_epoch >= len(self.train_loader))
                self.save_checkpoint()
                if self.stop_requested():
                    return self.stop_on_signal()
            return self.finish()
        except Exception as e:
            if is_out_of_memory(e):
                raise self.out_of_memory(e) from None
            raise
        finally:
            self.signals.uninstall()
            self.progress.close()

    def train_epoch(self, epoch: int, stop_at: int | None = None) -> bool:
        """One pass over the training data, or up to the step cap (or optimizer step ``stop_at``).
        Returns True when the ranks agreed to stop on a signal (a checkpoint has been saved)."""
        acc, model, state = self.accelerator, self.model, self.state
        model.train()
        self.train_loader.set_epoch(epoch)
        loader = self.train_loader
        if state.batches_in_epoch:
            # Resumed mid-epoch: the seedable sampler replays this epoch's order, minus what was
            # trained. Saves fall on optimizer steps only, so this is a whole number of windows.
            loader = skip_first_batches(self.train_loader, state.batches_in_epoch)
        else:
            self.epoch_window.reset()
        last_step = min(self.total_steps, stop_at or self.total_steps)
        accum, epoch_batches = self.cfg.train.gradient_accumulation_steps, len(self.train_loader)
        for batch in self.timed(loader):
            # Accelerate divides each micro-batch's loss by gradient_accumulation_steps. The epoch's
            # last window may hold fewer micro-batches: scale up so that every step's gradient is
            # the mean over the micro-batches it actually contains.
            window_start = state.batches_in_epoch - state.batches_in_epoch % accum
            loss_scale = accum / min(accum, epoch_batches - window_start)
            with acc.accumulate(model):
                losses, outputs = model(batch)
                acc.backward(losses["total_loss"] * loss_scale if loss_scale != 1 else losses["total_loss"])
                self.record_micro_batch(batch, losses, outputs)
                if acc.sync_gradients:
                    grad_norm = acc.clip_grad_norm_(model.parameters(), self.max_grad_norm)
                    self.record_optimizer_step(grad_norm)
                    self.skip_step_if_nonfinite(grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            state.batches_in_epoch += 1
            if not acc.sync_gradients:
                continue
            lrs = [group["lr"] for group in self.optimizer.param_groups]  # the rates this step ran with
            if acc.optimizer_step_was_skipped:  # fp16 overflow: no update, so the schedule must not advance
                self.window.skipped_steps += 1
            else:
                self.scheduler.step()
            state.optimizer_step += 1
            self.progress.update(1)
            step = state.optimizer_step
            media_due = bool(self.cfg.wandb.image_log_frequency) and step % self.cfg.wandb.image_log_frequency == 0
            if step % self.cfg.wandb.log_frequency == 0 or step == self.total_steps or media_due:
                # Before anything is logged at this step: an event of an earlier step logged after
                # it would be out of order (W&B drops decreasing steps).
                self.check_nonfinite()
            if self.is_log_step(step):
                self.log_window(lrs)
            if media_due:
                self.media.reconstructions(step)
            if self.at_step_boundary(epoch_ends=acc.gradient_state.end_of_dataloader or step >= last_step):
                return True
            if step >= last_step:
                break
        return False

    def at_step_boundary(self, epoch_ends: bool) -> bool:
        """All ranks agree on the signal and timer flags (host only), then save if a checkpoint is
        due. The end-of-epoch save is left to ``fit``, after validation."""
        step, every = self.state.optimizer_step, self.cfg.checkpoint.every_steps
        stop, timer_due = self.agreement.any(self.signals.received is not None, self._minutes_due())
        due = (every and step % every == 0) or timer_due
        if stop or (due and not epoch_ends):
            self.save_checkpoint()
        return stop

    def _minutes_due(self) -> bool:
        minutes = self.cfg.checkpoint.every_minutes
        return bool(minutes) and time.monotonic() - self.last_save_time >= 60.0 * minutes

    def stop_requested(self) -> bool:
        return self.agreement.any(self.signals.received is not None)[0]

    def timed(self, loader: Iterable[dict]) -> Iterator[dict]:
        """Iterate ``loader``, adding the time spent waiting for each batch to the window."""
        iterator = iter(loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.window.data_wait += time.perf_counter() - start
            yield batch

    def is_log_step(self, step: int) -> bool:
        return self.telemetry and (step % self.cfg.wandb.log_frequency == 0 or step == self.total_steps)

    def record_micro_batch(self, batch: dict, losses: dict, outputs: dict) -> None:
        """Add the micro-batch to the log window and the epoch window, on device."""
        stats = None
        if self.telemetry:
            stats = sample_stats(batch["pixel_values"], outputs["reconstruction"], outputs["latent"],
                                 outputs["logits"], batch["input_ids"], batch["attention_mask"])
        batch_size = batch["pixel_values"].shape[0]
        self.window.add_micro_batch(losses, batch_size, stats)
        self.epoch_window.add_micro_batch(losses, batch_size, stats)
        self.guard.add_loss(losses["total_loss"])
        self.state.samples_seen += batch_size * self.accelerator.num_processes  # even_batches: same on all ranks

    def record_optimizer_step(self, grad_norm: torch.Tensor) -> None:
        self.window.add_optimizer_step(grad_norm, self.max_grad_norm)
        self.epoch_window.add_optimizer_step(grad_norm, self.max_grad_norm)
        if self.is_log_step(self.state.optimizer_step + 1):
            # Read after clipping (accelerate unscales fp16 grads inside clip_grad_norm_ and a second
            # unscale is an error); the host divides by this step's clip coefficient.
            grads = {name: [p.grad for p in params if p.grad is not None]
                     for name, params in self.module_params.items()}
            row, per_module = grad_stats(grads)
            self.grad_detail = torch.cat([row, per_module])

    def skip_step_if_nonfinite(self, grad_norm: torch.Tensor) -> None:
        """Make this optimizer step a no-op, on device, if any rank's loss or the gradient is not finite."""
        bad = self.guard.check_step(grad_norm)
        if self.accelerator.scaler is None:
            # The fused AdamW skips the whole update where found_inf != 0 (GradScaler's mechanism).
            # Under fp16 the scaler sets found_inf itself: a non-finite loss overflows the grads.
            self.optimizer.optimizer.found_inf = bad

    def check_nonfinite(self) -> None:
        """Host read-out of the guard (a sync point, on log and checkpoint steps only): one event per
        skipped step, and the stop once train.max_nonfinite_steps were bad in a row."""
        report = self.guard.report(self.state.optimizer_step)
        self.state.nonfinite_steps = report.total
        self.state.consecutive_nonfinite_steps = report.consecutive
        limit = self.cfg.train.max_nonfinite_steps
        for step, total in zip(report.bad_steps, report.totals_at, strict=True):
            self.tracker.log({"nonfinite_step": 1, "nonfinite_steps": total}, step=step)
            if self.accelerator.is_main_process:
                print_event(f"warning: optimizer step {step}: non-finite loss or gradient; the update was skipped "
                            f"(weights and optimizer state unchanged). {report.total} such step(s) so far; the run "
                            f"stops after {limit} in a row (train.max_nonfinite_steps).")
        if report.max_consecutive >= limit:
            latest = self.checkpointer.complete()
            self.tracker.summary({"status": "failed: non-finite steps", "nonfinite_steps": report.total})
            self.tracker.finish()
            raise TrainingError(
                f"{report.max_consecutive} optimizer steps in a row had a non-finite loss or gradient "
                f"(train.max_nonfinite_steps={limit}); all of them were skipped, so no update was applied. "
                f"The last checkpoint, {latest[-1] if latest else 'none yet'}, is intact. Lower optim.lr, "
                "set optim.max_grad_norm, use train.mixed_precision no or bf16, or check the data, then continue "
                "with --train.resume auto")

    def log_window(self, lrs: list[float]) -> None:
        """A log step: the only place in the training loop where values reach the host."""
        acc, state, cfg = self.accelerator, self.state, self.cfg
        host = self.window.host_values()
        steps, elapsed, wait = max(host[1], 1), host[5], host[4]
        rank_row = [*self.hardware.read(), elapsed / steps, wait / elapsed if elapsed > 0 else 0.0]
        rows = gather_rows(acc, {**self.window.device_parts(), "grad_detail": self.grad_detail, "host": host,
                                 "hw": rank_row})
        samples = sum(r["host"][2] for r in rows)
        record = {
            **combine(rows),
            **gradient_detail(rows, list(self.module_params)),
            "learning_rate": lrs[0],
            **{f"learning_rate/{g.get('name', i)}": lr for i, (g, lr) in
               enumerate(zip(self.optimizer.param_groups, lrs, strict=True))},
            "epoch": state.optimizer_step / self.steps_per_epoch,
            "batch_size": cfg.train.batch_size,
            "effective_batch_size": cfg.train.batch_size * acc.num_processes * cfg.train.gradient_accumulation_steps,
            "optimizer_step": state.optimizer_step,
            "samples_seen": state.samples_seen,
            "samples_per_second": samples / elapsed if elapsed > 0 else 0.0,
            **hardware_record(rows),
        }
        if acc.scaler is not None:  # fp16: the loss scale, and the steps it skipped on overflow
            record["loss_scale"] = acc.scaler.get_scale()
            record["skipped_steps"] = rows[0]["host"][3]
        self.tracker.log(record, step=state.optimizer_step)
        self.last_train = record
        self.progress.set_postfix(loss=f"{record['total_loss']:.4f}", samples_s=f"{record['samples_per_second']:.1f}")
        self.window.reset()

    def end_epoch(self, epoch: int, complete: bool = True) -> None:
        """Epoch summary: training means over the epoch (so far, when not ``complete``: a max_steps
        cut), then the validation pass. Only a complete epoch moves the data position to the next."""
        state = self.state
        self.check_nonfinite()  # the epoch's last events are logged before its record
        rows = gather_rows(self.accelerator, {**self.epoch_window.device_parts(),
                                              "host": self.epoch_window.host_values()})
        train = combine(rows)
        val = self.evaluate()
        if complete:
            state.epoch, state.batches_in_epoch = epoch + 1, 0
        if val["val/total_loss"] < state.best_val_loss:
            state.best_val_loss, state.best_val_epoch = val["val/total_loss"], epoch + 1
        record = {
            **val,
            "epoch": state.optimizer_step / self.steps_per_epoch,
            "epoch_train_loss_avg": train["total_loss"],
            "epoch_val_loss_avg": val["val/total_loss"],
            "val_train_loss_ratio": val["val/total_loss"] / train["total_loss"],
            "image_caption_loss_ratio": train["loss_image"] / train["loss_caption"],
            "gradient_norm_trend": train["grad_norm"],
        }
        if "latent_std" in train:
            record["latent_std_trend"] = train["latent_std"]
        self.tracker.log(record, step=state.optimizer_step)
        self.media.captions(state.optimizer_step)
        self.last_val = record

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Exact values over the whole val split, the same for any number of processes: per-sample
        rows are gathered from every rank (``gather_for_metrics`` drops the samples padded in to
        even out the last batch), and the alignment term is computed after the gather, on
        consecutive groups of ``train.batch_size`` val samples in split order (see
        :func:`eval_alignment`), so padding duplicates never enter it as negatives."""
        acc, model = self.accelerator, self.model
        model.eval()
        self.validating = True  # read by out_of_memory: the fix for an OOM here is the eval batch
        terms_sum = torch.zeros(3, dtype=torch.float64, device=acc.device)
        sums = torch.zeros(len(SUM_FIELDS), dtype=torch.float64, device=acc.device)
        maxes = torch.full((len(MAX_FIELDS),), -math.inf, dtype=torch.float64, device=acc.device)
        latents, texts, ids = [], [], []
        for batch in self.val_loader:
            _, out = model(batch)
            terms = torch.stack([out["image_se"], out["caption_ce_sum"], out["caption_tokens"]], 1).double()
            s, m = sample_stats(batch["pixel_values"], out["reconstruction"], out["latent"], out["logits"],
                                batch["input_ids"], batch["attention_mask"])
            terms, s, m, lat, txt, cap = acc.gather_for_metrics(
                (terms, s, m, out["latent"], out["text_embedding"], batch["input_ids"]))
            terms_sum += terms.sum(dim=0)
            sums += s.sum(dim=0)
            maxes = torch.maximum(maxes, m.amax(dim=0))
            latents.append(lat)
            texts.append(txt)
            ids.append(cap)
        model.train()
        self.validating = False
        latent, text = torch.cat(latents), torch.cat(texts)
        scale = acc.unwrap_model(model).alignment.scale()
        align_sum = eval_alignment(latent, text, scale, self.cfg.train.batch_size).double().sum().view(1)
        recall = retrieval_recall(latent, text, torch.cat(ids))
        host = torch.cat([terms_sum, align_sum, sums, maxes, torch.stack(list(recall.values())).double()]).tolist()
        image_sum, ce_sum, tokens, align_sum = host[:4]
        count = host[4]  # the "samples" column
        val = {"loss_image": image_sum / count, "loss_caption": ce_sum / max(tokens, 1.0),
               "loss_alignment": align_sum / count}
        val["total_loss"] = weighted_total(self.model_config, val)
        n_sums = len(SUM_FIELDS)
        val.update(summarize(dict(zip(SUM_FIELDS, host[4:4 + n_sums], strict=True)),
                             dict(zip(MAX_FIELDS, host[4 + n_sums:4 + n_sums + len(MAX_FIELDS)], strict=True))))
        val.update(zip(recall, host[4 + n_sums + len(MAX_FIELDS):], strict=True))
        return {f"val/{k}": v for k, v in val.items()}

    def train_time(self) -> float:
        """Seconds spent training, over every session of this run (a resumed one included)."""
        return self.state.train_time_seconds + time.perf_counter() - self.started

    def save_checkpoint(self) -> Path:
        """Collective. Metrics reach the disk first: a checkpoint never refers to lost lines."""
        state = self.state
        if self.last_saved_step == state.optimizer_step:
            return self.checkpointer.path_for(state.optimizer_step)
        self.check_nonfinite()
        self.tracker.flush()
        path = self.checkpointer.save(
            state.optimizer_step, self.training_objects(),
            {**dataclasses.asdict(state), "train_time_seconds": self.train_time(), "last_train": self.last_train,
             "last_val": self.last_val},
            {"window": self.window.state_dict(), "epoch_window": self.epoch_window.state_dict()})
        self.last_saved_step, self.last_save_time = state.optimizer_step, time.monotonic()
        return path

    def stop_on_signal(self) -> dict[str, Any]:
        """The ranks agreed to stop and the checkpoint is saved: close cleanly, requeue, exit 0."""
        acc, state = self.accelerator, self.state
        got_usr1 = self.agreement.any(self.signals.received == signal.SIGUSR1)[0]
        checkpoint = self.checkpointer.path_for(self.last_saved_step)
        lines = [f"mmtrain: stopped by a signal at optimizer step {state.optimizer_step}; checkpoint {checkpoint}"]
        if acc.is_main_process and got_usr1 and self.cfg.train.requeue:
            if self.cfg.train.resume == "auto":
                lines.append(f"mmtrain: {requeue_slurm_job()}")
            else:
                lines.append("mmtrain: not requeued: the requeued job would not resume; add --train.resume auto")
        lines.append(f"mmtrain: continue with the same command and --train.resume auto "
                     f"(or --train.resume {shell_word(checkpoint)})")
        self.tracker.summary({"status": "preempted", "optimizer_steps": state.optimizer_step,
                              "checkpoint": str(checkpoint)})
        self.tracker.finish()
        print_main(acc, *lines)
        return {"preempted": True, "optimizer_steps": state.optimizer_step, "checkpoint": str(checkpoint)}

    def out_of_memory(self, error: BaseException) -> TrainingError:
        """Record what ran out and hand back the error to raise; checkpoints are not touched. The
        message ends with the flags that fix it, to add to the same command."""
        acc, cfg, state = self.accelerator, self.cfg, self.state
        figures = memory_figures(acc.device)
        with contextlib.suppress(Exception):  # events of earlier steps first; a failing read loses only them
            self.check_nonfinite()
        bs, accum = cfg.train.batch_size, cfg.train.gradient_accumulation_steps
        eval_bs = cfg.train.eval_batch_size or bs
        # Logged at the step that did not complete (in validation: the next one, which never started).
        self.tracker.log({"out_of_memory": 1, "oom/batch_size": eval_bs if self.validating else bs,
                          "oom/in_validation": int(self.validating), **{f"oom/{k}": v for k, v in figures.items()}},
                         step=state.optimizer_step + 1)
        self.tracker.summary({"status": "failed: out of memory"})
        self.tracker.finish()
        latest = self.checkpointer.complete()
        # Continue from this run's newest checkpoint; before its first save, from the checkpoint it
        # resumed (auto would find none here and start over).
        resume = "auto" if latest or self.resume_from is None else shell_word(self.resume_from)
        shown = ", ".join(f"{k} {v:.0f}" for k, v in figures.items())
        rank = f"rank {acc.process_index}, " if acc.num_processes > 1 else ""
        # The smallest factor of the batch size splits it into equal micro-batches: the same effective
        # batch, which resume accepts as the same run.
        factor = next((f for f in range(2, bs + 1) if bs % f == 0), None)
        if self.validating:
            where = (f"in the validation after optimizer step {state.optimizer_step} "
                     f"with train.eval_batch_size={eval_bs}")
            smaller = f"--train.eval_batch_size {eval_bs // 2} " if eval_bs > 1 else "--train.mixed_precision bf16 "
            fix = ("Validate in smaller batches (the values do not depend on it): continue with the same command "
                   f"plus {smaller}")
        elif factor is None:
            where = f"in optimizer step {state.optimizer_step + 1} with train.batch_size=1"
            fix = ("train.batch_size is already 1: use a smaller model or fewer processes per device, or continue "
                   "with the same command plus --train.mixed_precision bf16 (or fp16 on a GPU) ")
        else:
            where = f"in optimizer step {state.optimizer_step + 1} with train.batch_size={bs}"
            fix = (f"Keep the effective batch with smaller micro-batches: continue with the same command plus "
                   f"--train.batch_size {bs // factor} --train.gradient_accumulation_steps {accum * factor} ")
        return TrainingError(
            f"out of memory ({rank}{acc.device}) {where} per device [{shown} MB]. {fix}--train.resume {resume}. "
            f"The last checkpoint, {latest[-1] if latest else 'none yet'}, is intact. ({type(error).__name__})")

    def finish(self) -> dict[str, Any]:
        acc, state = self.accelerator, self.state
        checkpoint = self.save_checkpoint()  # already written by the last epoch end, in every normal run
        train_time = self.train_time()
        summary = {
            "final_validation_loss": self.last_val.get("val/total_loss"),
            "best_validation_loss": state.best_val_loss,
            "best_validation_epoch": state.best_val_epoch,
            "final_train_loss": self.last_train.get("total_loss"),
            "total_parameters": self.total_parameters,
            "optimizer_steps": state.optimizer_step,
            "samples_seen": state.samples_seen,
            "nonfinite_steps": state.nonfinite_steps,
            "train_time_seconds": train_time,
            "samples_per_second": state.samples_seen / train_time if train_time > 0 else 0.0,
        }
        model_dir = self.output_dir / "model"
        if acc.is_main_process:
            results = {**summary, **{k: v for k, v in self.last_val.items() if k.startswith("val/")}}
            export_model(acc.unwrap_model(self.model), self.tokenizer, model_dir,
                         model_card(self.run_config(), results))
        acc.wait_for_everyone()
        self.tracker.summary(summary)
        run_dir, mode, url = self.tracker.run_dir, self.tracker.mode, self.tracker.url
        self.tracker.finish()
        self.report(summary, checkpoint, model_dir, run_dir, mode, url)
        return {**summary, "checkpoint": str(checkpoint), "model_dir": str(model_dir),
                "wandb_run_dir": str(run_dir) if run_dir else None}

    def report(self, summary: dict[str, Any], checkpoint: Path, model_dir: Path, run_dir: Path | None,
               mode: str, url: str | None) -> None:
        t, v = self.last_train, self.last_val
        lines = ["", "== mmtrain: training finished ==",
                 f"steps {summary['optimizer_steps']}  samples {summary['samples_seen']}  "
                 f"time {summary['train_time_seconds']:.1f}s  ({summary['samples_per_second']:.1f} samples/s)"]
        if t:
            lines.append("final train window: " + "  ".join(f"{k} {t[k]:.4f}" for k in LOSS_NAMES))
        if v:
            lines.append("final validation:   " + "  ".join(f"{k} {v['val/' + k]:.4f}" for k in LOSS_NAMES))
        lines.append(f"best validation total_loss {summary['best_validation_loss']:.4f} "
                     f"(epoch {summary['best_validation_epoch']})")
        lines += [f"metrics:    {self.output_dir / 'metrics.jsonl'}",
                  f"checkpoint: {checkpoint}",
                  f"model:      {model_dir}  (MultimodalModel.from_pretrained)"]
        if run_dir is None:
            lines.append("W&B:        disabled")
        elif mode == "offline":
            # Each attempt of a resumed run is its own folder (W&B appends -1, -2 to a name taken in the
            # same second); they are uploaded together, in one command (README: W&B offline).
            own = re.compile(rf"offline-run-\d{{8}}_\d{{6}}-{re.escape(str(self.state.wandb_run_id))}(-\d+)?")
            attempts = sorted(p for p in run_dir.parent.iterdir() if own.fullmatch(p.name))
            if len(attempts) > 1:
                lines.append(f"W&B run:    {run_dir}  (offline, {len(attempts)} attempts; upload all with one command: "
                             f"wandb sync {' '.join(shell_word(p) for p in attempts)})")
            else:
                lines.append(f"W&B run:    {run_dir}  (offline; upload with: wandb sync {shell_word(run_dir)})")
        else:
            lines.append(f"W&B run:    {url or run_dir}")
        print_main(self.accelerator, *lines)
