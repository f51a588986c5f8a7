"""Non-finite steps are skipped on device and counted; K in a row stop the run; OOM stops it cleanly.

The NaN comes from a patched loss (a poisoned step), the OOM from a patched forward: a real
allocation failure cannot be provoked here without taking the machine down.
"""

import hashlib
import json

import torch
from conftest import TINY, read_jsonl, reset_accelerate

from mmtrain.cli import main
from mmtrain.model import MultimodalModel
from mmtrain.telemetry import Telemetry
from mmtrain.trainer import Trainer


def _poison(monkeypatch, steps: set[int], trainers: list, error: BaseException | None = None) -> None:
    """Make the loss NaN (or raise ``error``) in the given optimizer steps (1-based)."""
    forward = MultimodalModel.forward
    init = Trainer.__init__

    def record(self, cfg):
        trainers.append(self)
        init(self, cfg)

    def poisoned(self, batch):
        losses, outputs = forward(self, batch)
        if self.training and trainers[-1].state.optimizer_step + 1 in steps:
            if error is not None:
                raise error
            losses["total_loss"] = losses["total_loss"] * float("nan")
        return losses, outputs

    monkeypatch.setattr(Trainer, "__init__", record)
    monkeypatch.setattr(MultimodalModel, "forward", poisoned)


def _snapshots(monkeypatch) -> dict[int, tuple[list, list]]:
    """(parameters, AdamW moments) after every optimizer step."""
    taken: dict[int, tuple[list, list]] = {}
    step_end = Trainer.log_and_save_at_step_end

    def log_and_save_at_step_end(self, lrs, epoch_ends):
        params = [p.detach().clone() for p in self.model.parameters()]
        moments = [s["exp_avg"].clone() for s in self.optimizer.optimizer.state.values()]
        taken[self.state.optimizer_step] = (params, moments)
        return step_end(self, lrs, epoch_ends)

    monkeypatch.setattr(Trainer, "log_and_save_at_step_end", log_and_save_at_step_end)
    return taken


def _same(a: list, b: list) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _hashes(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_nonfinite_step_is_skipped_counted_and_logged(tmp_path, monkeypatch, capsys):
    trainers: list = []
    _poison(monkeypatch, {3}, trainers)
    snap = _snapshots(monkeypatch)
    code = main(["train", "--config", str(TINY), "--train.output_dir", str(tmp_path), "--wandb.mode", "disabled",
                 "--wandb.log_frequency", "1", "--model.dropout", "0.1"])
    assert code == 0
    assert _same(snap[3][0], snap[2][0]) and _same(snap[3][1], snap[2][1])  # weights and moments untouched
    assert not _same(snap[4][0], snap[3][0])  # the next good step trains again
    assert all(torch.isfinite(p).all() for p in snap[12][0])
    steps = trainers[-1].optimizer.optimizer.state[next(iter(trainers[-1].model.parameters()))]["step"]
    assert int(steps) == 11  # AdamW's own step count did not advance on the skipped step
    records = {r["step"]: r for r in read_jsonl(tmp_path / "metrics.jsonl")}
    assert [s for s, r in records.items() if r.get("nonfinite_step")] == [3]
    assert records[3]["nonfinite_steps"] == 1
    assert json.loads((tmp_path / "summary.json").read_text())["nonfinite_steps"] == 1
    assert "optimizer step 3: non-finite loss or gradient; the update was skipped" in capsys.readouterr().err


def test_k_nonfinite_steps_in_a_row_stop_the_run_and_keep_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    trainers: list = []
    _poison(monkeypatch, set(range(4, 100)), trainers)
    hashes: dict[str, dict[str, str]] = {}
    save = Trainer.save_checkpoint

    def save_checkpoint(self):
        path = save(self)
        hashes.setdefault(path.name, _hashes(path))
        return path

    monkeypatch.setattr(Trainer, "save_checkpoint", save_checkpoint)
    code = main(["train", "--config", str(TINY), "--train.output_dir", str(tmp_path), "--wandb.mode", "disabled",
                 "--wandb.log_frequency", "1", "--checkpoint.every_steps", "3", "--train.max_nonfinite_steps", "3"])
    assert code == 1
    err = capsys.readouterr().err
    assert "3 optimizer steps in a row had a non-finite loss or gradient (train.max_nonfinite_steps=3)" in err
    assert "Traceback" not in err
    assert trainers[-1].state.optimizer_step == 6  # stopped at the 3rd bad step (4, 5, 6), not later
    ckpts = sorted((tmp_path / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == ["step_00000003"]  # no save after the failure was seen
    assert _hashes(ckpts[0]) == hashes["step_00000003"]
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("nonfinite_step")] == [4, 5, 6]


def test_out_of_memory_stops_with_the_fix_and_leaves_checkpoints_intact(tmp_path, monkeypatch, capsys):
    trainers: list = []
    _poison(monkeypatch, {5}, trainers, error=torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    code = main(["train", "--config", str(TINY), "--train.output_dir", str(tmp_path), "--wandb.mode", "disabled",
                 "--checkpoint.every_steps", "2"])
    assert code == 1
    err = capsys.readouterr().err
    assert "out of memory" in err and "Traceback" not in err
    assert "--train.batch_size 8 --train.gradient_accumulation_steps 2" in err
    ckpts = [c.name for c in sorted((tmp_path / "checkpoints").glob("step_*"))]
    assert ckpts == ["step_00000002", "step_00000004"]
    oom = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r.get("out_of_memory")]
    assert len(oom) == 1 and oom[0]["step"] == 5 and oom[0]["oom/batch_size"] == 16 and oom[0]["oom/rss_mb"] > 0
    # and the run continues from the last checkpoint once memory allows
    monkeypatch.undo()
    reset_accelerate()
    assert main(["train", "--config", str(TINY), "--train.output_dir", str(tmp_path), "--wandb.mode", "disabled",
                 "--checkpoint.every_steps", "2", "--train.resume", "auto"]) == 0
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [2, 4, 6, 8, 10, 12]


def test_guard_flags_a_nonfinite_loss_even_with_finite_gradients():
    from mmtrain.resilience import NonFiniteGuard

    guard = NonFiniteGuard(torch.device("cpu"), 1)
    guard.add_loss(torch.tensor(float("inf")))
    assert guard.check_step(torch.tensor(1.0)).item() == 1.0
    guard.add_loss(torch.tensor(2.0))
    assert guard.check_step(torch.tensor(float("nan"))).item() == 1.0
    guard.add_loss(torch.tensor(2.0))
    assert guard.check_step(torch.tensor(3.0)).item() == 0.0
    report = guard.report(step=3)
    assert (report.total, report.consecutive, report.max_consecutive, report.bad_steps) == (2, 0, 2, [1, 2])


def _assert_ordered_and_complete(out, bad_steps: list[int]) -> None:
    """metrics.jsonl: strictly increasing steps, one line per step, every event at its own step with
    the count true there; the W&B offline record holds the same rows."""
    from wandb_files import offline_runs, read_run

    records = read_jsonl(out / "metrics.jsonl")
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), steps
    events = [(r["step"], r["nonfinite_steps"]) for r in records if r.get("nonfinite_step")]
    assert events == [(s, i + 1) for i, s in enumerate(bad_steps)]
    history: dict[int, dict] = {}
    for path in offline_runs(out):
        for row in read_run(path)["history"]:
            history.setdefault(row["_step"], {}).update(row)
    assert sorted(history) == steps
    for record in records:
        row = history[record["step"]]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and value is not None:
                assert row.get(key) == value, (record["step"], key)


def test_late_events_are_logged_in_order_with_their_own_counts(tmp_path, monkeypatch):
    """Non-finite steps at every position relative to log steps (every 4), media steps (every 5),
    epoch ends (6, 12) and checkpoint saves (every 5): before, at and after each."""
    bad = [1, 3, 4, 5, 6, 7, 9, 10, 11, 12]
    trainers: list = []
    _poison(monkeypatch, set(bad), trainers)
    assert main(["train", "--config", str(TINY), "--train.output_dir", str(tmp_path), "--wandb.mode", "offline",
                 "--wandb.log_frequency", "4", "--wandb.image_log_frequency", "5", "--wandb.media_samples", "2",
                 "--checkpoint.every_steps", "5", "--train.max_nonfinite_steps", "100"]) == 0
    _assert_ordered_and_complete(tmp_path, bad)


def test_divergent_run_logs_every_nonfinite_step_in_order(tmp_path):
    """The issue's example: lr 1e30 makes every step after the first non-finite; log every 4 steps
    with 6 steps per epoch."""
    assert main(["train", "--config", str(TINY), "--train.output_dir", str(tmp_path), "--optim.lr", "1e30",
                 "--optim.min_lr", "0", "--train.max_nonfinite_steps", "100", "--wandb.log_frequency", "4",
                 "--wandb.media_samples", "0"]) == 0
    records = read_jsonl(tmp_path / "metrics.jsonl")
    bad = [r["step"] for r in records if r.get("nonfinite_step")]
    assert len(bad) >= 5
    _assert_ordered_and_complete(tmp_path, bad)


def _record_trained_samples(monkeypatch, seen: list, trainers: list) -> None:
    """Append (epoch, sample key) for every sample of every micro-batch whose backward ran."""
    record = Telemetry.on_micro_batch

    def spy(self, batch, losses, outputs, *args, **kwargs):
        epoch = trainers[-1].state.epoch
        for pixels, ids in zip(batch["pixel_values"], batch["input_ids"], strict=True):
            seen.append((epoch, hashlib.sha256(pixels.numpy().tobytes()).hexdigest(), tuple(ids.tolist())))
        return record(self, batch, losses, outputs, *args, **kwargs)

    monkeypatch.setattr(Telemetry, "on_micro_batch", spy)


def test_the_out_of_memory_remedy_continues_the_epoch_exactly(tmp_path, monkeypatch, capsys):
    """OOM in step 5 (checkpoint at 4: 64 of 96 samples of epoch 0 trained), then the command the
    message gives. Every sample of the interrupted epoch is trained exactly once."""
    import collections
    import re

    args = ["train", "--config", str(TINY), "--train.output_dir", str(tmp_path), "--wandb.mode", "disabled",
            "--checkpoint.every_steps", "2"]
    trainers: list = []
    before: list = []
    _poison(monkeypatch, {5}, trainers, error=torch.OutOfMemoryError("CUDA out of memory"))
    _record_trained_samples(monkeypatch, before, trainers)
    assert main(args) == 1
    err = capsys.readouterr().err
    fix = re.search(r"continue with the same command plus (.*?)\. The last checkpoint", err)
    assert fix, err
    flags = fix.group(1).split()
    assert flags == ["--train.batch_size", "8", "--train.gradient_accumulation_steps", "2", "--train.resume", "auto"]
    monkeypatch.undo()
    reset_accelerate()
    after: list = []
    _poison(monkeypatch, set(), trainers)  # poisons nothing: records the new trainer
    _record_trained_samples(monkeypatch, after, trainers)
    assert main(args + flags) == 0
    interrupted = collections.Counter(tuple(key) for epoch, *key in before + after if epoch == 0)
    full_epoch = collections.Counter(tuple(key) for epoch, *key in after if epoch == 1)
    assert sum(full_epoch.values()) == 96
    assert interrupted == full_epoch  # each sample once: none repeated, none skipped
    steps = [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "val/total_loss" in r]
    assert steps == [6, 12]  # the same optimizer steps per epoch as the original split


def test_resume_refuses_a_different_effective_batch_with_the_arithmetic(tmp_path, capsys):
    args = ["train", "--config", str(TINY), "--train.output_dir", str(tmp_path), "--wandb.mode", "disabled",
            "--train.max_steps", "2", "--checkpoint.every_steps", "2"]
    assert main(args) == 0
    reset_accelerate()
    capsys.readouterr()
    assert main([*args, "--train.batch_size", "8", "--train.resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "16 x 1 x 1 = 16 -> 8 x 1 x 1 = 8" in err and "Traceback" not in err


def _flags_from(err: str) -> list[str]:
    import re
    import shlex

    fix = re.search(r"continue with the same command plus (.*?)\. The last checkpoint", err)
    assert fix, err
    return shlex.split(fix.group(1))


def test_out_of_memory_in_validation_suggests_a_smaller_eval_batch_that_works(tmp_path, monkeypatch, capsys):
    forward = MultimodalModel.forward

    def big_eval_batches_fail(self, batch):
        if not self.training and batch["pixel_values"].shape[0] > 8:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return forward(self, batch)

    monkeypatch.setattr(MultimodalModel, "forward", big_eval_batches_fail)
    args = ["train", "--config", str(TINY), "--train.output_dir", str(tmp_path), "--wandb.mode", "disabled",
            "--train.eval_batch_size", "32", "--checkpoint.every_steps", "3"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "in the validation after optimizer step 6 with train.eval_batch_size=32" in err
    assert _flags_from(err) == ["--train.eval_batch_size", "16", "--train.resume", "auto"]
    reset_accelerate()
    assert main([*args, "--train.eval_batch_size", "16", "--train.resume", "auto"]) == 1  # 16 > 8: again
    flags = _flags_from(capsys.readouterr().err)
    assert flags == ["--train.eval_batch_size", "8", "--train.resume", "auto"]
    reset_accelerate()
    assert main(args + flags) == 0
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "val/total_loss" in r] == [6, 12]


def test_out_of_memory_before_the_first_save_of_a_run_continued_from_elsewhere(tmp_path, monkeypatch, capsys):
    """Run B resumed from run A's checkpoint and ran out of memory before its own first save: the fix
    must continue from A's checkpoint (auto would find none in B and start over from random weights)."""
    a = ["train", "--config", str(TINY), "--train.output_dir", str(tmp_path / "A"), "--wandb.mode", "disabled",
         "--train.max_steps", "4", "--checkpoint.every_steps", "4"]
    assert main(a) == 0
    reset_accelerate()
    trainers: list = []
    _poison(monkeypatch, {6}, trainers, error=torch.OutOfMemoryError("CUDA out of memory"))
    b = ["train", "--config", str(TINY), "--train.output_dir", str(tmp_path / "B"), "--wandb.mode", "disabled",
         "--train.resume", str(tmp_path / "A" / "checkpoints" / "step_00000004")]
    capsys.readouterr()
    assert main(b) == 1
    flags = _flags_from(capsys.readouterr().err)
    assert flags[-2:] == ["--train.resume", str(tmp_path / "A" / "checkpoints" / "step_00000004")]
    monkeypatch.undo()
    reset_accelerate()
    assert main(b[:-2] + flags) == 0
    steps = [r["step"] for r in read_jsonl(tmp_path / "B" / "metrics.jsonl")]
    assert steps[0] > 4 and steps[-1] == 12
