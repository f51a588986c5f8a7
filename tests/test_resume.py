"""Kill, preempt and resume: a resumed run is the same run, bitwise (CPU, fp32, 1 and 2 processes).

Every run here is a real `mmtrain train` process (through tests/fault_run.py, which SIGKILLs
itself at an exact moment); 2-process runs are real gloo groups under `accelerate launch`.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY, read_jsonl
from safetensors.torch import load_file
from wandb_files import offline_runs

pytestmark = pytest.mark.slow

# 96 samples: 6 micro-batches per epoch on 1 process (3 optimizer steps with accumulation 2),
# 3 per rank on 2 processes (3 steps). 3 epochs = 9 optimizer steps either way. Dropout on, so the
# RNG streams matter; a checkpoint every 2 steps plus one at each epoch end (steps 3, 6, 9).
ARGS = ["--config", str(TINY), "--train.epochs", "3", "--model.dropout", "0.1", "--checkpoint.every_steps", "2",
        "--wandb.log_frequency", "1", "--wandb.media_samples", "0"]
ONE = [*ARGS, "--train.gradient_accumulation_steps", "2"]
LAUNCH_2 = [shutil.which("accelerate") or "accelerate", "launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
# Timing and host readings differ between any two runs; everything else must be identical.
NOT_REPRODUCIBLE = ("hw/", "step_time", "samples_per_second", "data_wait_fraction", "cpu_percent",
                    "system_cpu_percent", "rss_mb", "peak_rss_mb", "ram_percent",
                    # findings judged on those readings (timing, host memory)
                    "diagnostics/data_wait", "diagnostics/straggler", "diagnostics/gpu_memory")


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _train(out: Path, args: list[str], processes: int = 1, expect: int | None = 0, resume: bool = False,
           **env: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable] if processes == 1 else LAUNCH_2
    cmd = [*launcher, str(REPO / "tests" / "fault_run.py"), *args, "--train.output_dir", str(out)]
    if resume:
        cmd += ["--train.resume", "auto"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=600)
    if expect is not None:
        assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*"))


def _resumed_from(proc: subprocess.CompletedProcess) -> int:
    line = next(line for line in proc.stdout.splitlines() if "resuming from" in line)
    return int(line.split("optimizer step ")[1].split(",")[0])


def assert_same_run(reference: Path, resumed: Path) -> None:
    """Per-step logged values, final weights and final optimizer state: bitwise equal."""
    ref, res = read_jsonl(reference / "metrics.jsonl"), read_jsonl(resumed / "metrics.jsonl")
    assert [r["step"] for r in res] == [r["step"] for r in ref]  # no step missing, repeated or reordered
    for a, b in zip(ref, res, strict=True):
        keys = {k for k in a if not k.startswith(NOT_REPRODUCIBLE) and k not in NOT_REPRODUCIBLE}
        assert keys == {k for k in b if not k.startswith(NOT_REPRODUCIBLE) and k not in NOT_REPRODUCIBLE}
        different = {k: (a[k], b[k]) for k in keys if a[k] != b[k]}
        assert not different, f"step {a['step']}: {different}"
    wa, wb = load_file(reference / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    last = f"step_{_steps(reference)[-1]:08d}"
    oa, ob = (torch.load(d / "checkpoints" / last / "optimizer.pt", weights_only=True) for d in (reference, resumed))
    for pa, pb in zip(oa["state"].values(), ob["state"].values(), strict=True):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.fixture(scope="module")
def reference_1(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref1") / "run"
    _train(out, [*ONE, "--wandb.mode", "disabled"])
    return out


def test_sigkill_at_any_moment_then_resume_is_bitwise_one_process(reference_1, tmp_path):
    out = tmp_path / "run"
    args = [*ONE, "--wandb.mode", "offline"]
    # Right after the epoch-end checkpoint of step 3 was committed.
    _train(out, args, expect=-signal.SIGKILL, MMTRAIN_KILL="after_save:3")
    assert _steps(out) == [2, 3]
    # Mid-epoch: after step 5, whose metrics line may or may not have reached the disk.
    b = _train(out, args, expect=-signal.SIGKILL, resume=True, MMTRAIN_KILL="after_step:5")
    assert _resumed_from(b) == 3
    # During the save of step 8: every file written, the marker too, but not yet renamed.
    c = _train(out, args, expect=-signal.SIGKILL, resume=True, MMTRAIN_KILL="save_commit:8")
    assert _resumed_from(c) == 4
    assert (out / "checkpoints" / ".tmp-step_00000008" / "train_state.json").is_file()
    d = _train(out, args, resume=True)
    assert _resumed_from(d) == 6  # the half-saved step 8 was not picked up
    assert not list((out / "checkpoints").glob(".tmp-*"))  # and the next save cleared it
    assert_same_run(reference_1, out)
    # W&B: four attempts, one run id (offline: four run folders that `wandb sync` joins).
    runs = offline_runs(out)
    assert len(runs) == 4 and len({r.stem.rsplit("-", 1)[1] for r in runs}) == 1


def test_sigkill_then_resume_is_bitwise_two_processes(tmp_path):
    reference, out = tmp_path / "ref", tmp_path / "run"
    args = [*ARGS, "--wandb.mode", "disabled"]
    _train(reference, args, processes=2)
    # Both ranks die mid-epoch, after step 5.
    _train(out, args, processes=2, expect=None, MMTRAIN_KILL="after_step:5")
    assert _steps(out) == [2, 3, 4]
    # Rank 0 dies inside the save of step 8 (rank files written, model/optimizer not); rank 1
    # is left in the barrier and is taken down with it.
    b = _train(out, args, processes=2, expect=None, resume=True, MMTRAIN_KILL="save_write:8:0")
    assert b.returncode != 0 and _resumed_from(b) == 4
    c = _train(out, args, processes=2, resume=True)
    assert _resumed_from(c) == 6  # an epoch boundary
    assert_same_run(reference, out)


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be signalled"
        path = out / "metrics.jsonl"
        if path.is_file() and any(r.get("step", 0) >= step for r in read_jsonl(path)):
            return
        time.sleep(0.1)
    raise AssertionError(f"step {step} never reached")


def test_sigterm_two_processes_saves_at_a_step_boundary_and_exits_0(tmp_path):
    out, pids, threads = tmp_path / "run", tmp_path / "pids", tmp_path / "threads"
    pids.mkdir()
    threads.mkdir()
    # Long enough to be signalled mid-run; a NaN loss on rank 1 only, at step 2: both ranks skip it.
    args = [*ARGS, "--train.epochs", "60", "--checkpoint.every_steps", "0", "--wandb.mode", "disabled"]
    cmd = [*LAUNCH_2, str(REPO / "tests" / "fault_run.py"), *args, "--train.output_dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(MMTRAIN_PIDFILE=str(pids), MMTRAIN_NAN="2:1",
                                                    MMTRAIN_THREADS_AT_EXIT=str(threads)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_step(out, 4, proc)
        for rank in (0, 1):
            os.kill(int((pids / f"rank{rank}.pid").read_text()), signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]  # the launcher: both ranks exited 0
    for rank in (0, 1):
        # The gloo group's worker threads were joined before interpreter shutdown: alive there, one that
        # frees a finished collective's tensor takes the GIL and aborts the process (mmtrain/cli.py).
        names = (threads / f"rank{rank}.txt").read_text().split()
        assert not [n for n in names if "gloo" in n], names
    line = next(line for line in stdout.splitlines() if "stopped by a signal" in line)
    stopped = int(line.split("optimizer step ")[1].split(";")[0])
    assert 4 <= stopped < 180
    meta = json.loads((out / "checkpoints" / f"step_{stopped:08d}" / "train_state.json").read_text())
    state = meta["train_state"]
    assert state["optimizer_step"] == stopped and meta["world_size"] == 2
    assert state["batches_in_epoch"] == (stopped % 3) or (stopped % 3 == 0 and state["batches_in_epoch"] in (0, 3))
    assert state["nonfinite_steps"] == 1  # rank 1's NaN at step 2: one agreed skip
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("nonfinite_step")] == [2]
    assert all(r["total_loss"] is not None for r in records if r["step"] > 2 and "total_loss" in r)
    assert not (out / "model").exists()  # not finished, so not exported


def test_sigusr1_under_slurm_saves_requeues_and_resume_auto_finishes(tmp_path):
    out, pids, bin_dir = tmp_path / "run", tmp_path / "pids", tmp_path / "bin"
    pids.mkdir()
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    scontrol = bin_dir / "scontrol"  # SLURM cannot run here: a stand-in that records its arguments
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    scontrol.chmod(0o755)
    # With a DataLoader worker: SLURM signals every process of the job, so the worker gets SIGUSR1
    # too (whose default action kills it), and it must still let the run save and exit.
    args = [*ONE, "--train.epochs", "30", "--wandb.mode", "disabled", "--train.resume", "auto",
            "--data.num_workers", "1"]
    env = _env(MMTRAIN_PIDFILE=str(pids), SLURM_JOB_ID="4242", PATH=f"{bin_dir}:{os.environ['PATH']}")
    cmd = [sys.executable, str(REPO / "tests" / "fault_run.py"), *args, "--train.output_dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_for_step(out, 3, proc)
        os.killpg(proc.pid, signal.SIGUSR1)  # the whole process group, as SLURM does
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    assert "SLURM job 4242 requeued" in stdout
    # What the requeued job does: the same command, which resumes and finishes.
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl")]
    assert steps == list(range(1, 91))  # 30 epochs x 3 steps: nothing missing, nothing twice


def test_sigusr1_to_every_process_of_a_launch_sh_job_saves_and_requeues(tmp_path):
    """What SLURM does with `--signal=USR1@120`: every process of the job step gets the signal,
    the launcher included. launch.sh keeps the launcher alive; both ranks save and exit 0."""
    import psutil

    out, bin_dir = tmp_path / "run", tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (bin_dir / "scontrol").chmod(0o755)
    # SLURM_STEP_ID: this is one node's task of a step (`srun launch.sh`), not the batch script.
    env = _env(NUM_PROCESSES="2", SLURM_JOB_ID="77", SLURM_STEP_ID="0", PATH=f"{bin_dir}:{os.environ['PATH']}",
               PYTHON=sys.executable)
    cmd = ["bash", str(REPO / "launch.sh"), *ARGS, "--train.epochs", "60", "--checkpoint.every_steps", "0",
           "--wandb.mode", "disabled", "--train.resume", "auto", "--train.output_dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_for_step(out, 4, proc)
        job = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for p in job:
            p.send_signal(signal.SIGUSR1)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert calls.read_text().split() == ["requeue", "77"]
    line = next(line for line in stdout.splitlines() if "stopped by a signal" in line)
    stopped = int(line.split("optimizer step ")[1].split(";")[0])
    meta = json.loads((out / "checkpoints" / f"step_{stopped:08d}" / "train_state.json").read_text())
    assert meta["train_state"]["optimizer_step"] == stopped and meta["world_size"] == 2
