"""Checkpoint policy and contents, and every way a resume can be refused (exit 2, nothing touched)."""

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY, read_jsonl, reset_accelerate
from wandb_files import offline_runs

from mmtrain.cli import main
from mmtrain.run_dir import keep_metrics_until

# Accumulation 2: 3 optimizer steps per epoch, 6 in all; a checkpoint after every optimizer step.
BASE = ["train", "--config", str(TINY), "--train.gradient_accumulation_steps", "2", "--checkpoint.every_steps", "1",
        "--checkpoint.keep_last", "20"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "run"
    assert main([*BASE, "--train.output_dir", str(out), "--wandb.mode", "offline"]) == 0
    reset_accelerate()
    return out


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def copy(run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def test_a_checkpoint_after_every_step_holds_the_whole_training_state(run):
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == [f"step_{s:08d}" for s in range(1, 7)]
    last = ckpts[-1]
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rank_00000.pt", "config.yaml",
                 "tokenizer/tokenizer.json", "train_state.json"):
        assert (last / name).is_file(), name
    for pt in last.glob("*.pt"):  # nothing in a checkpoint needs pickle's code execution
        torch.load(pt, weights_only=True)
    meta = json.loads((last / "train_state.json").read_text())
    state = meta["train_state"]
    assert state["optimizer_step"] == 6 and state["epoch"] == 2 and state["samples_seen"] == 192
    assert state["nonfinite_steps"] == 0 and meta["world_size"] == 1 and meta["step"] == 6
    assert meta["nonfinite_guard"] == {"nonfinite_steps": 0, "consecutive_nonfinite_steps": 0}
    assert meta["loggers"]["wandb"]["run_id"] == offline_runs(run)[0].stem.rsplit("-", 1)[1]
    assert meta["telemetry"]["last_val"]["val/total_loss"] > 0
    rank = torch.load(last / "rank_00000.pt", weights_only=True)
    assert set(rank) == {"rng", "telemetry_windows"}
    assert set(rank["telemetry_windows"]) == {"window", "epoch_window"}


def test_saves_fall_only_on_optimizer_steps_never_inside_an_accumulation_window(run):
    for ckpt in sorted((run / "checkpoints").glob("step_*")):
        state = json.loads((ckpt / "train_state.json").read_text())["train_state"]
        assert state["batches_in_epoch"] % 2 == 0  # 2 micro-batches per optimizer step
        assert state["batches_in_epoch"] == 2 * (state["optimizer_step"] - 3 * state["epoch"])


def test_keep_last_prunes_the_oldest(tmp_path):
    out = tmp_path / "run"
    assert main([*BASE, "--train.output_dir", str(out), "--wandb.mode", "disabled", "--checkpoint.keep_last", "2",
                 "--train.epochs", "1"]) == 0
    assert [c.name for c in sorted((out / "checkpoints").glob("*"))] == ["step_00000002", "step_00000003"]


def test_every_minutes_saves_between_epoch_ends(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--config", str(TINY), "--train.output_dir", str(out), "--wandb.mode", "disabled",
                 "--train.epochs", "1", "--checkpoint.every_minutes", "1e-6", "--checkpoint.keep_last", "10"]) == 0
    assert len(list((out / "checkpoints").glob("step_*"))) == 6  # every step is past the (tiny) interval


def test_resume_auto_from_the_last_checkpoint_of_a_finished_run_only_re_exports(copy, capsys):
    before = read_jsonl(copy / "metrics.jsonl")
    assert main([*BASE, "--train.output_dir", str(copy), "--wandb.mode", "disabled", "--train.resume", "auto"]) == 0
    assert read_jsonl(copy / "metrics.jsonl") == before
    assert "resuming from" in capsys.readouterr().out


def _refused(out: Path, capsys, *args: str) -> str:
    before = _hashes(out)
    code = main([*BASE, "--train.output_dir", str(out), "--wandb.mode", "disabled", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mmtrain: error: ") and "Traceback" not in err, err
    assert _hashes(out) == before  # nothing already written was touched
    return err


def test_resume_with_a_different_model_config_names_the_fields(copy, capsys):
    err = _refused(copy, capsys, "--train.resume", "auto", "--model.latent_dim", "64", "--model.dropout", "0.2")
    assert "model.latent_dim: 32 -> 64" in err and "model.dropout: 0.0 -> 0.2" in err


def test_resume_from_a_folder_that_is_not_a_complete_checkpoint(copy, capsys):
    partial = copy / "checkpoints" / ".tmp-step_00000007"
    shutil.copytree(copy / "checkpoints" / "step_00000006", partial)
    (partial / "train_state.json").unlink()
    err = _refused(copy, capsys, "--train.resume", str(partial))
    assert "is not a complete mmtrain checkpoint (no train_state.json)" in err


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_file_that_would_run_code_is_refused(copy, tmp_path, capsys):
    marker = tmp_path / "pwned"
    target = copy / "checkpoints" / "step_00000006" / "optimizer.pt"
    with target.open("wb") as f:  # a plain pickle, as torch.load without weights_only would run it
        pickle.dump({"state": _Exploit(marker)}, f)
    err = _refused(copy, capsys, "--train.resume", "auto")
    assert "optimizer.pt cannot be loaded safely" in err
    assert not marker.exists()


def test_an_output_dir_holding_another_run_is_refused_without_resume_or_overwrite(copy, capsys):
    err = _refused(copy, capsys)
    assert "already holds a run" in err and "--train.resume auto" in err and "--train.overwrite true" in err


def test_metrics_after_the_checkpoint_and_a_torn_last_line_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a": 3}\n{"step": 4, "a"')
    assert keep_metrics_until(path, 2) == 2
    assert read_jsonl(path) == [{"step": 1, "a": 1}, {"step": 2, "a": 2}]


def test_another_number_of_processes_with_another_effective_batch_is_refused(copy, capsys):
    """A checkpoint of 2 processes x 16 resumed by 1 process x 16 (accumulation 2 both): the effective batch halves. The
    arithmetic shows the saved process count on the left (elastic resume: tests/test_elastic_resume.py)."""
    state_file = copy / "checkpoints" / "step_00000006" / "train_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "world_size": 2}))
    err = _refused(copy, capsys, "--train.resume", "auto")
    assert "effective batch (train.batch_size x processes x train.gradient_accumulation_steps): " \
           "16 x 2 x 2 = 64 -> 16 x 1 x 2 = 32" in err
