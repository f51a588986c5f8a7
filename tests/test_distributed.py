"""Real 2-process CPU runs (gloo): one process group of world size 2, exactly one W&B run."""

import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO
from expected_metrics import assert_every_metric

pytestmark = pytest.mark.slow

ARGS = ["-m", "mmtrain", "train", "--config", "configs/tiny.yaml", "--wandb.log_frequency", "1"]


def _launch(launcher: list[str], out) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run([*launcher, *ARGS, "--train.output_dir", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _check_one_run_of_world_size_two(out) -> None:
    # Only the main process starts W&B; it records every metric, hardware for both ranks.
    records, run = assert_every_metric(out, ranks=2)
    assert run["config"]["world_size"] == 2
    assert run["config"]["effective_batch_size"] == 32
    # 96 samples over 2 ranks x 16 per device = 3 optimizer steps per epoch, 2 epochs.
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert {"hw/rank0/cpu_percent", "hw/rank1/cpu_percent"} <= set(records[0])
    assert records[0]["hw/rank0/rss_mb"] != records[0]["hw/rank1/rss_mb"]  # two processes, two readings
    assert records[-1]["samples_seen"] == 192


def test_accelerate_launch_multi_gpu_on_cpu_forms_one_group(tmp_path):
    launcher = [shutil.which("accelerate") or "accelerate", "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    _launch(launcher, tmp_path / "acc")
    _check_one_run_of_world_size_two(tmp_path / "acc")


def test_torchrun_forms_one_group(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    _launch(launcher, tmp_path / "torchrun")
    _check_one_run_of_world_size_two(tmp_path / "torchrun")


def test_accelerate_config_file_and_launch_sh(tmp_path):
    """The shipped CPU config, through launch.sh as a user would start it."""
    env = {**os.environ, "NUM_PROCESSES": "2", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "launch_sh"
    proc = subprocess.run(["bash", "launch.sh", "--config", "configs/tiny.yaml", "--wandb.log_frequency", "1",
                           "--train.output_dir", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _check_one_run_of_world_size_two(out)


# 33 val samples in eval batches of 8: the last batch holds one real sample, and Accelerate pads
# it with duplicates on the second rank. lr 1e-30 keeps the weights at their initial values.
SAME_WEIGHTS = ["--data.synthetic_train_size", "32", "--data.synthetic_val_size", "33", "--train.eval_batch_size",
                "8", "--optim.lr", "1e-30", "--optim.min_lr", "0", "--train.epochs", "1", "--wandb.media_samples", "0"]


def _val_record(out) -> dict:
    from conftest import read_jsonl

    (record,) = [r for r in read_jsonl(out / "metrics.jsonl") if "val/total_loss" in r]
    return {k: v for k, v in record.items() if k.startswith("val/")}


def test_validation_does_not_depend_on_the_process_count(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The same global batch (validation contrasts in groups of it: model.global_alignment).
    one = subprocess.run([sys.executable, *ARGS, *SAME_WEIGHTS, "--train.batch_size", "32",
                          "--train.output_dir", str(tmp_path / "one")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    launcher = [shutil.which("accelerate") or "accelerate", "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    two = subprocess.run([*launcher, *ARGS, *SAME_WEIGHTS, "--train.output_dir", str(tmp_path / "two")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    val_one, val_two = _val_record(tmp_path / "one"), _val_record(tmp_path / "two")
    assert set(val_one) == set(val_two) and "val/loss_alignment" in val_one
    for key, value in val_one.items():
        assert val_two[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
