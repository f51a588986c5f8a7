"""Exact resume, in process and in seconds: save -> restore -> next steps, bitwise.

The quick-loop counterpart of tests/test_resume.py (which kills real processes and is marked
slow). One uninterrupted run saves a checkpoint mid-epoch and trains on; a second Trainer resumes
from that checkpoint and trains the same steps. Weights, AdamW state and every logged value
(timings aside) must be bitwise equal. Dropout is on, so the RNG streams matter; the LR changes at
every step, so the schedule's position matters; the checkpoint falls mid-epoch and inside a log
window, so the data position and the log/epoch windows matter.

A second case saves at an epoch's last step, before its validation (where a stop signal saves),
and resumes through the whole run with ``fit``.

``test_each_forgotten_piece_of_state_is_caught`` proves the comparison can fail: it resumes with
one piece of state not restored (RNG, LR schedule, data position, log windows) and requires the
comparison to report the difference.
"""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import read_jsonl, reset_accelerate, tiny_config

import mmtrain.checkpoint
import mmtrain.trainer
from mmtrain.windows import Window

# 32 samples in micro-batches of 4 with accumulation 2: 8 micro-batches = 4 optimizer steps per
# epoch, 8 in the run (so the cosine LR moves at every step). The checkpoint falls at step 2:
# 4 micro-batches into epoch 0, inside the log window of steps 1-3 (log every 3 steps).
CONFIG = {"data.synthetic_train_size": 32, "data.synthetic_val_size": 8, "train.batch_size": 4,
          "train.gradient_accumulation_steps": 2, "train.epochs": 2, "model.dropout": 0.1,
          "optim.warmup_steps": 0, "wandb.mode": "disabled", "wandb.log_frequency": 3, "wandb.media_samples": 0,
          "checkpoint.every_steps": 2}
SAVED_AT, STOP_AT = 2, 4  # train on to the end of epoch 0, then its epoch record (windows + validation)
# Timing and host readings differ between any two runs; everything else must be identical.
NOT_REPRODUCIBLE = ("hw/", "step_time", "samples_per_second", "data_wait_fraction", "cpu_percent",
                    "system_cpu_percent", "rss_mb", "peak_rss_mb", "ram_percent",
                    # findings judged on those readings (timing, host memory)
                    "diagnostics/data_wait", "diagnostics/straggler", "diagnostics/gpu_memory")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """A tiny model gains nothing from intra-op threads; on a busy 2-core machine they slow it down."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train_to_the_end_of_epoch_0(out, **overrides) -> SimpleNamespace:
    from mmtrain.trainer import Trainer

    trainer = Trainer(tiny_config(out, **CONFIG, **overrides))
    trainer.train_epoch(0, stop_at=STOP_AT)
    trainer.validate_and_log_epoch(0)
    trainer.loggers.flush()
    model = trainer.accelerator.unwrap_model(trainer.model)
    result = SimpleNamespace(
        weights={k: v.detach().clone() for k, v in model.state_dict().items()},
        optimizer=trainer.optimizer.state_dict(),
        lr=[g["lr"] for g in trainer.optimizer.param_groups],
        records={r["step"]: r for r in read_jsonl(out / "metrics.jsonl")},
        state=trainer.state)
    trainer.accelerator.end_training()
    reset_accelerate()
    return result


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run; its checkpoint at step SAVED_AT is written on the way, by the loop."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("reference")
        result = _train_to_the_end_of_epoch_0(out)
    finally:
        torch.set_num_threads(before)
    result.checkpoint = out / "checkpoints" / f"step_{SAVED_AT:08d}"
    assert (result.checkpoint / "train_state.json").is_file()
    return result


def _resume(reference, out) -> SimpleNamespace:
    return _train_to_the_end_of_epoch_0(out, **{"train.resume": str(reference.checkpoint)})


def _differences(a: SimpleNamespace, b: SimpleNamespace) -> list[str]:
    """What differs between two runs at the end of epoch 0, bitwise; timings aside."""
    found = [f"weights {k}" for k in a.weights if not torch.equal(a.weights[k], b.weights[k])]
    for (i, sa), sb in zip(a.optimizer["state"].items(), b.optimizer["state"].values(), strict=True):
        found += [f"optimizer state {i}.{k}" for k in sa if not torch.equal(torch.as_tensor(sa[k]),
                                                                             torch.as_tensor(sb[k]))]
    if a.lr != b.lr:
        found.append(f"learning rate {a.lr} != {b.lr}")
    for step in sorted(b.records):
        ra, rb = a.records[step], b.records[step]
        keys = {k for k in ra if not k.startswith(NOT_REPRODUCIBLE)}
        if keys != {k for k in rb if not k.startswith(NOT_REPRODUCIBLE)}:
            found.append(f"step {step}: logged keys differ")
        found += [f"step {step}: {k} {ra[k]!r} != {rb.get(k)!r}" for k in sorted(keys) if ra[k] != rb.get(k)]
    return found


def test_resume_from_a_mid_epoch_checkpoint_is_bitwise_the_same_run(reference, tmp_path):
    resumed = _resume(reference, tmp_path / "resumed")
    # The resumed run logged the steps after the checkpoint: the window of steps 1-3 (steps 1-2
    # restored from the checkpoint) and step 4 with the epoch record.
    assert sorted(resumed.records) == [3, 4] and "epoch_train_loss_avg" in resumed.records[4]
    assert resumed.state.optimizer_step == reference.state.optimizer_step == STOP_AT
    assert resumed.state.samples_seen == reference.state.samples_seen == 32
    assert _differences(reference, resumed) == []


def _no_scheduler_restore(monkeypatch):
    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "load_state_dict", lambda self, state: None)


def _no_rng_restore(monkeypatch):
    monkeypatch.setattr(mmtrain.checkpoint.RNGState, "load_state_dict", lambda self, state: None)


def _no_data_position(monkeypatch):
    """The epoch starts again from its first batch instead of skipping what was trained."""
    monkeypatch.setattr(mmtrain.trainer, "skip_first_batches", lambda loader, batches: loader)


def _no_window_restore(monkeypatch):
    monkeypatch.setattr(Window, "load_state_dict", lambda self, state: None)


@pytest.mark.parametrize(("forget", "shows_in"), [
    (_no_rng_restore, "weights"),          # other dropout masks from step 3 on
    (_no_scheduler_restore, "weights"),    # step 4 runs at the schedule's value 1 instead of 3
    (_no_data_position, "weights"),        # steps 3-4 train on the epoch's first batches again
    (_no_window_restore, "step 3"),        # the step-3 window would hold step 3 only
], ids=["rng", "scheduler", "data-position", "log-windows"])
def test_each_forgotten_piece_of_state_is_caught(reference, tmp_path, monkeypatch, forget, shows_in):
    forget(monkeypatch)
    broken = _resume(reference, tmp_path / "broken")
    found = _differences(reference, broken)
    assert any(line.startswith(shows_in) for line in found), found


def test_resume_from_a_save_at_an_epochs_last_step_before_its_validation(tmp_path):
    """A stop signal at an epoch's last optimizer step saves before the epoch's validation: the
    resumed run skips every batch of that epoch, then validates it, then trains on, as if never
    stopped (the whole run, 2 epochs, compared with an uninterrupted one)."""
    from mmtrain.trainer import Trainer

    def finish(trainer):
        trainer.fit()
        model = trainer.accelerator.unwrap_model(trainer.model)
        result = SimpleNamespace(weights={k: v.detach().clone() for k, v in model.state_dict().items()},
                                 optimizer=trainer.optimizer.state_dict(),
                                 lr=[g["lr"] for g in trainer.optimizer.param_groups],
                                 records={r["step"]: r for r in read_jsonl(trainer.output_dir / "metrics.jsonl")})
        trainer.accelerator.end_training()
        reset_accelerate()
        return result

    settings = {k: v for k, v in CONFIG.items() if k != "checkpoint.every_steps"}
    whole = finish(Trainer(tiny_config(tmp_path / "whole", **settings)))
    stopped = Trainer(tiny_config(tmp_path / "stopped", **settings))
    stopped.train_epoch(0, stop_at=STOP_AT)   # the last step of epoch 0, as at_step_boundary saves on a signal
    checkpoint = stopped.save_checkpoint()
    stopped.accelerator.end_training()
    reset_accelerate()
    assert json.loads((checkpoint / "train_state.json").read_text())["train_state"]["batches_in_epoch"] == 8
    resumed = finish(Trainer(tiny_config(tmp_path / "stopped", **settings, **{"train.resume": "auto"})))
    assert sorted(resumed.records) == sorted(whole.records) == [3, 4, 6, 8]
    assert _differences(whole, resumed) == []


def test_a_run_cut_by_max_steps_and_continued_finishes_its_epoch(tmp_path):
    """tiny: 6 steps per epoch. A --train.max_steps 4 cut validates at step 4 but leaves epoch 0
    open; continuing without the cap trains its last 2 steps and ends at step 12 with 192 samples
    (it used to skip them: step 10, 160 samples, and the schedule never reached min_lr)."""
    from mmtrain.cli import main

    args = ["train", "--config", "configs/tiny.yaml", "--train.output_dir", str(tmp_path), "--wandb.mode", "disabled"]
    assert main([*args, "--train.max_steps", "4"]) == 0
    reset_accelerate()
    assert main([*args, "--train.resume", "auto"]) == 0
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "val/total_loss" in r] == [4, 6, 12]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["optimizer_steps"] == 12 and summary["samples_seen"] == 192
    last = next(r for r in reversed(records) if "learning_rate" in r)
    assert last["step"] == 12 and last["learning_rate"] == pytest.approx(1e-4)
