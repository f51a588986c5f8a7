"""The training loop on Accelerate: ``Trainer.fit`` and ``train_epoch``, read top to bottom, are the
whole run; every other concern is a component built in ``__init__`` (telemetry, evaluator, guard,
loggers, checkpoint manager, media). One optimizer step, inside ``accumulate``: ``model(batch)`` ->
telemetry adds the micro-batch on device -> ``backward`` -> on the sync micro-batch
``clip_grad_norm_`` -> the non-finite guard (on device) -> optimizer and scheduler step -> on a log
step only, one gather and one host copy for the loggers -> the ranks agree on stop/save (host only).

Names say side effects: ``save_*`` writes a checkpoint, ``*_or_raise`` may stop the run, and a
docstring starting "Collective" must run on every rank at the same point.
"""

import contextlib
import dataclasses
import signal
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import skip_first_batches
from accelerate.utils import set_seed

from mmtrain.checkpoint import CheckpointManager, RNGState, TrainingObjects, TrainState, find_resume, rng_preserved
from mmtrain.config import Config
from mmtrain.data import build_data, resumed_position
from mmtrain.diagnostics import build_diagnostics
from mmtrain.distributed import build_accelerator, full_model, is_sharded, print_main, progress_bar
from mmtrain.errors import TrainingError, shell_word
from mmtrain.evaluate import Evaluator
from mmtrain.export import export_model, model_card
from mmtrain.loggers import build_loggers
from mmtrain.media import build_media
from mmtrain.model import MultimodalModel, build_model
from mmtrain.optim import build_optimizer, build_scheduler, optimizer_steps
from mmtrain.resilience import (
    NonFiniteGuard,
    OutOfMemory,
    StepAgreement,
    StopSignals,
    is_out_of_memory,
    memory_figures,
    stop_lines,
)
from mmtrain.run_dir import (
    SavedLayout,
    check_same_run,
    final_report,
    for_sweep_agent,
    prepare_output_dir,
    run_config,
    run_summary,
)
from mmtrain.speed import apply_channels_last, reuse_host_memory
from mmtrain.telemetry import EPOCH_METRICS, Telemetry


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg = for_sweep_agent(cfg)  # under `wandb agent`: <output_dir>/<run id>, a folder per run
        self.accelerator = acc = build_accelerator(cfg.train)
        # The precision actually trained in (auto: the launcher's; fp16 on CPU: bf16) replaces the request,
        # so config.yaml reproduces the run and a resume under another launcher lists the change.
        self.cfg = cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                                            mixed_precision=acc.mixed_precision))
        self.output_dir = Path(cfg.train.output_dir).expanduser()
        self.reuses_host_memory = reuse_host_memory(cfg.train.reuse_host_memory)  # before the data is built
        self.state = TrainState()
        set_seed(cfg.train.seed)
        root = self.output_dir / "checkpoints"
        self.resume_from = find_resume(acc, root, cfg.train.resume)
        saved_layout = check_same_run(acc, self.resume_from, cfg) if self.resume_from else None
        # Everything the user gave us is validated before output_dir is touched, so a bad input
        # never costs an earlier run its files.
        self.data = build_data(cfg, acc, self.resume_from)
        model = build_model(cfg.model, len(self.data.tokenizer))
        # train.channels_last: NHWC weights, and pixel_values converted on the way into forward (a pre-hook).
        self.channels_last = apply_channels_last(model, cfg.train.channels_last, acc.device, acc.mixed_precision,
                                                 sharded=is_sharded(acc))
        self.model_config, self.total_parameters = model.config, model.num_parameters()
        self.model, self.optimizer, self.train_loader, self.val_loader = acc.prepare(
            model, build_optimizer(model, cfg.optim), self.data.train_loader, self.data.val_loader)
        # Sized from the sharded loader, so it is right for any process count and accumulation.
        self.steps_per_epoch, self.total_steps = optimizer_steps(
            len(self.train_loader), cfg.train.gradient_accumulation_steps, cfg.train.epochs, cfg.train.max_steps)
        # Not prepared: a prepared scheduler steps once per process per optimizer step.
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.total_steps)
        self.telemetry = Telemetry(acc, model, self.optimizer, cfg, self.steps_per_epoch, self.total_steps)
        self.evaluator = Evaluator(acc, group_size=cfg.train.batch_size * (
            acc.num_processes if cfg.model.global_alignment else 1))  # training's negatives + 1
        self.guard = NonFiniteGuard(acc.device, acc.num_processes, cfg.train.max_nonfinite_steps)
        self.agreement, self.signals = StepAgreement(acc.num_processes), StopSignals()
        self.loggers = build_loggers(acc.is_main_process, self.output_dir, cfg.log.loggers, cfg.wandb, EPOCH_METRICS)
        self.diagnostics = build_diagnostics(acc.is_main_process, cfg, self.total_steps, acc.num_processes,
                                             self.loggers)
        self.checkpointer = CheckpointManager(
            acc, root, cfg.checkpoint,
            TrainingObjects(model, self.optimizer, self.scheduler, acc.scaler, self.data.tokenizer, cfg),
            states={"train_state": self.state, "telemetry": self.telemetry, "nonfinite_guard": self.guard,
                    "loggers": self.loggers, "diagnostics": self.diagnostics},
            rank_states={"rng": RNGState(), "telemetry_windows": self.telemetry.windows})
        if self.resume_from is not None:
            self.restore(self.resume_from, saved_layout)
        prepare_output_dir(acc, self.output_dir, cfg, self.resume_from, self.state.optimizer_step, self.checkpointer)
        with rng_preserved():  # set-up below draws no number the training steps would have drawn
            self.loggers.open(self.run_config(), self.state.optimizer_step if self.resume_from else None)
            self.media = build_media(acc.is_main_process, acc.device, cfg, model, self.data.val, self.data.tokenizer,
                                     self.loggers, acc.autocast, sharded=is_sharded(acc))
        self.progress = progress_bar(acc, self.total_steps, self.state.optimizer_step, cfg.train.progress_bar)

    def restore(self, path: Path, saved: SavedLayout) -> None:
        """Load the checkpoint into every component; its data position is converted to this run's
        batch size and process count (a new split of the same effective batch continues at the same
        sample). Raises CheckpointError before output_dir is touched."""
        state, acc = self.state, self.accelerator
        self.checkpointer.restore(path)
        state.batches_in_epoch = resumed_position(path, state.batches_in_epoch, saved.batch_size, saved.processes,
                                                  self.cfg.train.batch_size, acc.num_processes, len(self.data.train),
                                                  len(self.train_loader))
        print_main(acc, f"mmtrain: resuming from {path} (optimizer step {state.optimizer_step}, "
                   f"epoch {state.epoch} + {state.batches_in_epoch} batches)")

    def run_config(self) -> dict[str, Any]:
        acc, train = self.accelerator, self.cfg.train
        return run_config(self.cfg, {
            "world_size": acc.num_processes, "device": acc.device.type, "mixed_precision": acc.mixed_precision,
            "per_device_batch_size": train.batch_size,
            "effective_batch_size": train.batch_size * acc.num_processes * train.gradient_accumulation_steps,
            "train_samples": len(self.data.train), "val_samples": len(self.data.val),
            "skipped_bad_samples": self.data.skipped, "vocab_size": self.model_config.vocab_size,
            "total_parameters": self.total_parameters, "steps_per_epoch": self.steps_per_epoch,
            "total_optimizer_steps": self.total_steps, "host_memory_reuse": self.reuses_host_memory,
            **self.data.loader.as_config()})

    # ------------------------------------------------------------------------------------ the run

    def fit(self) -> dict[str, Any]:
        state, cfg = self.state, self.cfg
        state.session_start = time.perf_counter()  # training time starts now, not at set-up
        self.signals.install()
        try:
            for epoch in range(state.epoch, cfg.train.epochs):
                if state.optimizer_step >= self.total_steps:
                    break
                if self.train_epoch(epoch):
                    return self.close_after_stop_signal()
                # A max_steps cut validates where it stopped but leaves the epoch open: a run continued
                # without the cap finishes this epoch instead of skipping the rest of it.
                self.validate_and_log_epoch(epoch, complete=state.batches_in_epoch >= len(self.train_loader))
                self.save_checkpoint()
                if self.agreement.any(self.signals.received is not None)[0]:
                    return self.close_after_stop_signal()
            return self.finish_and_export()
        except Exception as e:
            if is_out_of_memory(e):
                raise self.record_out_of_memory(e) from None
            raise
        finally:
            self.signals.uninstall()
            self.progress.close()

    def train_epoch(self, epoch: int, stop_at: int | None = None) -> bool:
        """One pass over the training data, or up to the step cap (or optimizer step ``stop_at``).
        Collective. Returns True when the ranks agreed to stop on a signal (a checkpoint is saved)."""
        acc, model, state, telemetry = self.accelerator, self.model, self.state, self.telemetry
        model.train()
        telemetry.windows.resume()  # the windows' clocks count training time only
        self.train_loader.set_epoch(epoch)
        loader = self.train_loader
        if state.batches_in_epoch:
            # Resumed mid-epoch: the seedable sampler replays this epoch's order, minus what was
            # trained. Saves fall on optimizer steps only, so this is a whole number of windows.
            loader = skip_first_batches(self.train_loader, state.batches_in_epoch)
        else:
            telemetry.windows.epoch.reset()
        last_step = min(self.total_steps, stop_at or self.total_steps)
        accum, epoch_batches = self.cfg.train.gradient_accumulation_steps, len(self.train_loader)
        for batch in telemetry.timed(loader):
            # Accelerate divides each micro-batch's loss by gradient_accumulation_steps. The epoch's
            # last window may hold fewer micro-batches: scale up so that every step's gradient is
            # the mean over the micro-batches it actually contains.
            window_start = state.batches_in_epoch - state.batches_in_epoch % accum
            loss_scale = accum / min(accum, epoch_batches - window_start)
            with acc.accumulate(model):
                losses, outputs = model(batch)
                # Before backward: the forward's outputs are still in cache (0.5 against 0.85 ms per
                # laptop step for the same statistics read after backward has streamed the gradients).
                telemetry.on_micro_batch(batch, losses, outputs, state.optimizer_step + 1,
                                         closes_epoch=window_start + accum >= epoch_batches)
                acc.backward(losses["total_loss"] * loss_scale if loss_scale != 1 else losses["total_loss"])
                self.guard.add_loss(losses["total_loss"])
                state.samples_seen += batch["pixel_values"].shape[0] * acc.num_processes  # even_batches: same on all
                if acc.sync_gradients:
                    grad_norm = acc.clip_grad_norm_(model.parameters(), telemetry.max_grad_norm)
                    telemetry.on_optimizer_step(grad_norm, state.optimizer_step + 1)
                    self.skip_step_if_nonfinite(grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            state.batches_in_epoch += 1
            if not acc.sync_gradients:
                continue
            lrs = [group["lr"] for group in self.optimizer.param_groups]  # the rates this step ran with
            if acc.optimizer_step_was_skipped:  # fp16 overflow: no update, so the schedule must not advance
                telemetry.on_skipped_step()
            else:
                self.scheduler.step()
            state.optimizer_step += 1
            self.progress.update(1)
            if self.log_and_save_at_step_end(lrs, acc.gradient_state.end_of_dataloader or
                                             state.optimizer_step >= last_step):
                return True
            if state.optimizer_step >= last_step:
                break
        return False

    def log_and_save_at_step_end(self, lrs: list[float], epoch_ends: bool) -> bool:
        """Collective. Log the step if due, then the ranks agree on the signal and timer flags
        (host only) and save if a checkpoint is due; the end-of-epoch save is left to ``fit``,
        after validation. Returns whether the ranks agreed to stop."""
        step, telemetry = self.state.optimizer_step, self.telemetry
        media_due = telemetry.media_due(step)
        if telemetry.at_log_frequency(step) or media_due:
            # Before anything is logged at this step: an event of an earlier step logged after it
            # would be out of order (W&B drops decreasing steps).
            self.read_nonfinite_or_raise()
        if telemetry.should_log(step):
            record = telemetry.gather_log_record(step, self.state.samples_seen, lrs)
            self.loggers.log(record, step)
            self.progress.set_postfix(loss=f"{record['total_loss']:.4f}",
                                      samples_s=f"{record['samples_per_second']:.1f}")
        if media_due:
            self.media.reconstructions(step)
        stop, timer_due = self.agreement.any(self.signals.received is not None, self.checkpointer.timer_due())
        if (stop or not epoch_ends) and self.checkpointer.should_save(step, stop=stop, timer_due=timer_due):
            self.save_checkpoint()
        return stop

    def skip_step_if_nonfinite(self, grad_norm: torch.Tensor) -> None:
        """Make this optimizer step a no-op, on device, if any rank's loss or the gradient is not finite.
        Collective when distributed (a 1-element all-reduce, not waited for)."""
        bad = self.guard.check_step(grad_norm)
        if self.accelerator.scaler is None:
            # The fused AdamW skips the whole update where found_inf != 0 (GradScaler's mechanism).
            # Under fp16 the scaler sets found_inf itself: a non-finite loss overflows the grads.
            self.optimizer.optimizer.found_inf = bad

    def read_nonfinite_or_raise(self) -> None:
        """Host read-out of the guard (a sync point, on log and checkpoint steps only): one event per
        skipped step; raises TrainingError once train.max_nonfinite_steps were bad in a row."""
        self.state.nonfinite_steps = self.guard.log_events_or_raise(
            self.state.optimizer_step, self.loggers, self.accelerator.is_main_process, self.checkpointer.latest_text)

    def validate_and_log_epoch(self, epoch: int, complete: bool = True) -> None:
        """Collective. Epoch summary: training means over the epoch (so far, when not ``complete``:
        a max_steps cut), then the validation pass. Only a complete epoch moves the data position."""
        state = self.state
        self.read_nonfinite_or_raise()  # the epoch's last events are logged before its record
        with self.telemetry.windows.paused():  # a log window spanning the epoch end times its steps only
            val = self.evaluator.run(self.model, self.val_loader)
        record = self.telemetry.gather_epoch_record(val, state.optimizer_step)
        if complete:
            state.epoch, state.batches_in_epoch = epoch + 1, 0
        if val["val/total_loss"] < state.best_val_loss:
            state.best_val_loss, state.best_val_epoch = val["val/total_loss"], epoch + 1
        self.loggers.log(record, step=state.optimizer_step)
        with self.telemetry.windows.paused():  # greedy captions of the media samples: not step time either
            self.media.captions(state.optimizer_step)

    def save_checkpoint(self) -> Path:
        """Collective: the checkpoint of this step (once). The guard's events and every logged line
        reach the disk first, so a checkpoint never refers to lost lines; may raise as
        :meth:`read_nonfinite_or_raise` does."""
        step = self.state.optimizer_step
        if self.checkpointer.last_saved_step != step:
            self.read_nonfinite_or_raise()
            self.loggers.flush()
            with self.telemetry.windows.paused():  # checkpoint writes are not step time
                self.checkpointer.save(step)
        return self.checkpointer.path_for(step)

    def close_after_stop_signal(self) -> dict[str, Any]:
        """Collective. The ranks agreed to stop and the checkpoint is saved: close cleanly, requeue
        the SLURM job if asked (main rank), exit 0."""
        acc, step = self.accelerator, self.state.optimizer_step
        got_usr1 = self.agreement.any(self.signals.received == signal.SIGUSR1)[0]
        checkpoint = self.checkpointer.path_for(self.checkpointer.last_saved_step)
        requeue = acc.is_main_process and got_usr1 and self.cfg.train.requeue
        self.loggers.summary({"status": "preempted", "optimizer_steps": step, "checkpoint": str(checkpoint)})
        self.loggers.close()
        print_main(acc, *stop_lines(step, checkpoint, requeue, self.cfg.train.resume))
        return {"preempted": True, "optimizer_steps": step, "checkpoint": str(checkpoint)}

    def record_out_of_memory(self, error: BaseException) -> TrainingError:
        """Log what ran out, close the loggers, and hand back the error to raise; checkpoints are
        not touched. Continue from this run's newest checkpoint; before its first save, from the
        checkpoint it resumed (auto would find none here and start over)."""
        acc, cfg = self.accelerator, self.cfg
        figures = memory_figures(acc.device)
        oom = OutOfMemory(acc.device, acc.process_index if acc.num_processes > 1 else None, self.state.optimizer_step,
                          self.evaluator.running, cfg.train.batch_size, cfg.train.gradient_accumulation_steps,
                          cfg.train.eval_batch_size or cfg.train.batch_size)
        with contextlib.suppress(Exception):  # events of earlier steps first; a failing read loses only them
            self.read_nonfinite_or_raise()
        self.loggers.log(oom.record(figures), step=oom.step + 1)
        self.loggers.summary({"status": "failed: out of memory"})
        self.loggers.close()
        own = self.checkpointer.complete()
        resume = "auto" if own or self.resume_from is None else shell_word(self.resume_from)
        return oom.error(error, figures, resume, self.checkpointer.latest_text())

    def finish_and_export(self) -> dict[str, Any]:
        """Collective. The final checkpoint (already written by the last epoch end in every normal
        run), the summary, the exported model (gathered on every rank under FSDP, written by the
        main rank) and the report."""
        acc = self.accelerator
        checkpoint = self.save_checkpoint()
        last_train, last_val = self.telemetry.last_train, self.telemetry.last_val
        summary = run_summary(self.state, self.state.train_time(), self.total_parameters, last_train, last_val)
        model_dir = self.output_dir / "model"
        # Under FSDP the full weights exist only once every rank has sent its shards (collective).
        plain = full_model(acc, self.model, lambda: MultimodalModel(self.model_config))
        if acc.is_main_process:
            results = {**summary, **{k: v for k, v in last_val.items() if k.startswith("val/")}}
            export_model(plain, self.data.tokenizer, model_dir, model_card(self.run_config(), results))
        acc.wait_for_everyone()
        self.loggers.summary({**summary, "findings": self.diagnostics.findings()})
        self.loggers.close()
        print_main(acc, *final_report(self.output_dir, summary, last_train, last_val, checkpoint, model_dir,
                                      self.loggers.report_lines()))
        return {**summary, "checkpoint": str(checkpoint), "model_dir": str(model_dir)}
