"""launch.sh and accelerate_configs/: two "nodes" on loopback, SLURM batch and task paths (with
stand-ins for scontrol/srun, which cannot run here), job-array requeue, config files, shellcheck."""

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from expected_metrics import assert_every_metric

from mmtrain.resilience import requeue_slurm_job

LAUNCH = REPO / "launch.sh"
NODELIST_HOSTS = ["gpu01", "gpu02", "gpu03", "gpu07"]  # what `scontrol show hostnames 'gpu[01-03,07]'` prints


def _stub(bin_dir: Path, name: str, body: str) -> None:
    """An executable ``name`` in ``bin_dir`` (put first on PATH) running the shell ``body``."""
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
    (bin_dir / name).chmod(0o755)


def _scontrol(bin_dir: Path, calls: Path | None = None) -> None:
    """scontrol: expands the test's nodelist; records every call's arguments in ``calls``."""
    record = f'echo "$@" >> {calls}\n' if calls else ""
    hosts = "\\n".join(NODELIST_HOSTS)
    _stub(bin_dir, "scontrol", f'{record}if [ "$1 $2" = "show hostnames" ]; then printf "{hosts}\\n"; fi')


def _env(bin_dir: Path | None = None, **extra: str) -> dict[str, str]:
    """This environment without any SLURM variable of the machine running the tests, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for name in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NUM_PROCESSES", "GPUS_PER_NODE",
                 "ACCELERATE_CONFIG", "MMTRAIN_DRY_RUN", "CUDA_VISIBLE_DEVICES"):
        env.pop(name, None)
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _words(line: str) -> dict[str, str]:
    """``--option value`` pairs of a printed command line."""
    words = line.split()
    return {w: words[i + 1] for i, w in enumerate(words[:-1]) if w.startswith("--")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_loopback_form_one_world_with_one_wandb_run(tmp_path):
    """Two launch.sh invocations, NODE_RANK 0 and 1, one CPU process each: one gloo world of size 2,
    the c10d rendezvous on 127.0.0.1, one W&B run holding both ranks' hardware."""
    out = tmp_path / "run"
    port = str(_free_port())
    # GPUS_PER_NODE=0: the automatic detection (a torch import per launcher) is test_distributed's.
    common = dict(NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, GPUS_PER_NODE="0")
    cmd = ["bash", str(LAUNCH), "--", "--config", "configs/tiny.yaml", "--train.epochs", "1",
           "--wandb.log_frequency", "1", "--wandb.media_samples", "0", "--train.output_dir", str(out)]
    nodes = [subprocess.Popen(cmd, cwd=REPO, env=_env(NODE_RANK=str(rank), **common), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (1, 0)]  # rank 1 waits for the head
    try:
        logs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    records, run = assert_every_metric(out, ranks=2)  # one offline run; hw/rank0/* and hw/rank1/*
    assert run["config"]["world_size"] == 2
    assert [r["step"] for r in records] == [1, 2, 3]  # 96 samples / (2 ranks x 16): 3 steps, not 6
    assert records[0]["hw/rank0/rss_mb"] != records[0]["hw/rank1/rss_mb"]
    assert sum("training finished" in log for log in logs) == 1  # the main rank's summary, once


def test_by_hand_dry_run_flags_and_environment_agree_and_the_older_form_still_works():
    def dry(args: list[str], **env: str) -> str:
        proc = subprocess.run(["bash", str(LAUNCH), *args], cwd=REPO, env=_env(GPUS_PER_NODE="0", **env),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    single = dry(["--dry-run", "--", "--config", "configs/tiny.yaml"], NUM_PROCESSES="2")
    assert single == dry(["--config", "configs/tiny.yaml"], NUM_PROCESSES="2", MMTRAIN_DRY_RUN="1")  # no `--`
    assert single.split() == ["accelerate", "launch", "--config_file", str(REPO / "accelerate_configs" / "cpu.yaml"),
                              "--num_processes", "2", "-m", "mmtrain", "train", "--config", "configs/tiny.yaml"]
    by_env = dry(["--dry-run", "--", "--config", "configs/tiny.yaml"], NNODES="3", NODE_RANK="1", MASTER_ADDR="h0")
    by_flags = dry(["--nnodes", "3", "--node-rank=1", "--master-addr", "h0", "--dry-run", "--",
                    "--config", "configs/tiny.yaml"])
    assert by_env == by_flags
    options = _words(by_env)
    assert (options["--num_machines"], options["--machine_rank"], options["--num_processes"]) == ("3", "1", "3")
    assert (options["--main_process_ip"], options["--main_process_port"], options["--rdzv_conf"]) == \
        ("h0", "29500", "is_host=false")
    # One GPU: one process unless more are asked for (they then share it, multi_gpu.yaml's launcher mode).
    for asked, config, count in ((None, "single_gpu.yaml", "1"), ("2", "multi_gpu.yaml", "2")):
        proc = subprocess.run(["bash", str(LAUNCH), *(["--nproc-per-node", asked] if asked else []), "--dry-run",
                               "--", "--config", "configs/tiny.yaml"], cwd=REPO, env=_env(GPUS_PER_NODE="1"),
                              capture_output=True, text=True, timeout=60)
        options = _words(proc.stdout)
        assert options["--config_file"].endswith(config) and options["--num_processes"] == count, proc.stdout


def _slurm_job(**extra: str) -> dict[str, str]:
    """A 4-node job of 4 GPUs a node, as SLURM sets it up in the batch script."""
    job = dict(SLURM_JOB_ID="123456", SLURM_NNODES="4", SLURM_JOB_NUM_NODES="4", SLURM_JOB_NODELIST="gpu[01-03,07]",
               SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="8",
               SLURM_NODEID="0")  # the batch node's own id: must not reach the other nodes
    return {**job, **extra}


def test_sbatch_dry_run_renders_the_command_of_every_node(tmp_path):
    bin_dir = tmp_path / "bin"
    _scontrol(bin_dir)
    proc = subprocess.run(["bash", str(LAUNCH), "--dry-run", "--", "--config", "configs/default.yaml"], cwd=REPO,
                          env=_env(bin_dir, **_slurm_job()), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 4, proc.stdout
    hosts = [line.split(":")[0] for line in lines]
    options = [_words(line) for line in lines]
    assert hosts == NODELIST_HOSTS
    assert sorted(o["--machine_rank"] for o in options) == ["0", "1", "2", "3"]
    assert {o["--main_process_ip"] for o in options} == {"gpu01"}
    assert {o["--num_processes"] for o in options} == {"16"}
    assert {o["--num_machines"] for o in options} == {"4"}
    assert {o["--main_process_port"] for o in options} == {str(15000 + 123456 % 15000)}
    assert {o["--rdzv_backend"] for o in options} == {"c10d"}
    assert all(line.endswith("-m mmtrain train --config configs/default.yaml") for line in map(str.strip, lines))
    # What the batch script itself would start: one task per node, this repository's launch.sh.
    assert "srun --nodes=4 --ntasks=4 --ntasks-per-node=1" in proc.stderr and f"bash {LAUNCH} --" in proc.stderr


@pytest.mark.parametrize("gpus", [{"SLURM_GPUS_ON_NODE": "4"}, {"SLURM_GPUS_PER_NODE": "a100:4"},
                                  {"SLURM_GPUS_PER_NODE": "gpu:4"}, {"GPUS_PER_NODE": "4"}])
def test_srun_task_uses_its_own_node_id(tmp_path, gpus):
    """Inside the step (SLURM_STEP_ID set, as srun sets it), each node's task renders its own rank."""
    bin_dir = tmp_path / "bin"
    _scontrol(bin_dir)
    job = {**_slurm_job(SLURM_STEP_ID="0", SLURM_NODEID="2", SLURM_STEP_NUM_NODES="4", SLURM_STEP_NUM_TASKS="4"),
           "SLURM_GPUS_ON_NODE": ""}
    proc = subprocess.run(["bash", str(LAUNCH), "--dry-run", "--", "--config", "configs/default.yaml"], cwd=REPO,
                          env=_env(bin_dir, **{**job, **gpus}), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    [line] = proc.stdout.splitlines()
    options = _words(line)
    assert line.startswith("gpu03: accelerate launch ")
    assert (options["--machine_rank"], options["--main_process_ip"], options["--num_processes"]) == ("2", "gpu01", "16")
    assert options["--config_file"].endswith("accelerate_configs/multi_node.yaml")


def test_batch_script_forwards_signals_to_the_step_and_returns_its_exit_code(tmp_path):
    """sbatch's shell starts the step with srun, passes SIGUSR1/SIGHUP on to it (srun hands them to
    every task), keeps waiting after a signal, and exits with the step's exit code. SIGTERM is not
    passed on (Slurm sends it to every process of the step itself; a second copy would cut the
    launchers' graceful stop short): the shell survives it and keeps waiting."""
    bin_dir, calls, got = tmp_path / "bin", tmp_path / "srun.args", tmp_path / "srun.signals"
    _scontrol(bin_dir)
    # srun: once its traps are set, records its arguments, then runs until SIGHUP, on which it
    # exits 7 (a failed step).
    _stub(bin_dir, "srun", f'trap "echo USR1 >> {got}" USR1\ntrap "echo TERM >> {got}" TERM\n'
                           f'trap "echo HUP >> {got}; exit 7" HUP\n'
                           f'echo "$@" > {calls}.tmp && mv {calls}.tmp {calls}\nwhile :; do sleep 0.05; done')
    proc = subprocess.Popen(["bash", str(LAUNCH), "--master-port", "25000", "--", "--config", "configs/tiny.yaml"],
                            cwd=tmp_path, env=_env(bin_dir, **_slurm_job()), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not calls.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        while not got.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the batch script ended on SIGUSR1"
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None, "the batch script ended on SIGTERM"
        proc.send_signal(signal.SIGHUP)
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert got.read_text().split() == ["USR1", "HUP"]
    assert proc.returncode == 7
    args = calls.read_text().split()
    assert args[:5] == ["--nodes=4", "--ntasks=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=8"]
    assert args[5:] == ["bash", str(LAUNCH), "--master-port", "25000", "--", "--config", "configs/tiny.yaml"]
    assert (tmp_path / "logs").is_dir()  # where #SBATCH --output writes, in the submit folder


@pytest.mark.parametrize("env, args, message", [
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, [],
     "NODE_RANK (--node-rank) must be a whole number from 0 to 1"),
    ({"NNODES": "2"}, [], "NNODES=2 needs MASTER_ADDR (or --master-addr)"),
    ({}, ["--nnodes", "two"], "NNODES (--nnodes) must be a whole number >= 1, got 'two'"),
    ({"GPUS_PER_NODE": "0"}, ["--nproc-per-node", "0"], "NUM_PROCESSES (--nproc-per-node) must be a whole number"),
    (_slurm_job(SLURM_STEP_ID="0"), ["--node-rank", "1"], "under SLURM the node count and this node's rank come from"),
    (_slurm_job(SLURM_STEP_ID="0", SLURM_STEP_NUM_NODES="4", SLURM_STEP_NUM_TASKS="16"), [],
     "this step runs 16 tasks on 4 nodes; launch.sh must be one task per node"),
])
def test_bad_launch_settings_get_one_line_naming_the_fix(tmp_path, env, args, message):
    bin_dir = tmp_path / "bin"
    _scontrol(bin_dir)
    proc = subprocess.run(["bash", str(LAUNCH), "--dry-run", *args, "--", "--config", "configs/tiny.yaml"],
                          cwd=REPO, env=_env(bin_dir, **env), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(f"launch.sh: {message}") and len(proc.stderr.splitlines()) == 1, proc.stderr


def test_job_array_task_requeues_itself_not_the_array(tmp_path, monkeypatch):
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.calls"
    _scontrol(bin_dir, calls)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "1001")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "1000")  # the array's id: also the first task's SLURM_JOB_ID
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert requeue_slurm_job() == "SLURM job 1000_3 requeued"
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID")
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    assert requeue_slurm_job() == "SLURM job 1001 requeued"
    assert calls.read_text().splitlines() == ["requeue 1000_3", "requeue 1001"]


def test_every_accelerate_config_loads_and_is_commented():
    from accelerate.commands.config.config_args import load_config_from_file

    files = sorted((REPO / "accelerate_configs").glob("*.yaml"))
    assert {"cpu.yaml", "single_gpu.yaml", "multi_gpu.yaml", "multi_node.yaml"} <= {f.name for f in files}
    for path in files:
        config = load_config_from_file(str(path))  # accelerate's own loader, as `accelerate launch` reads it
        assert config.compute_environment.value == "LOCAL_MACHINE", path.name
        assert yaml.safe_load(path.read_text())["distributed_type"] == config.distributed_type.value, path.name
        assert path.read_text().startswith("# "), f"{path.name} must start with a comment block"


def test_launch_sh_is_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck; .ci/run installs it)")
    proc = subprocess.run(["shellcheck", str(LAUNCH)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout
