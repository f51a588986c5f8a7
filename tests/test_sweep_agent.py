"""Under ``wandb agent``: the environment the agent gives each run, faked (no W&B server here).

The agent (wandb 0.31, wandb/wandb_agent.py ``Agent._command_run``) sets WANDB_SWEEP_ID, a WANDB_RUN_ID per
run and WANDB_SWEEP_PARAM_PATH (a config-<run id>.yaml of ``{name: {value: v}}``), and runs the sweep's
command with ``--optim.lr=...``; it stops a run with SIGTERM (``_command_stop``). What cannot run here: the
server giving out runs, and an online run joining the sweep.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import wandb
from conftest import REPO, TINY, read_jsonl
from wandb_files import REAL_INIT, offline_runs, read_run

from mmtrain.config import WandbConfig, load_config
from mmtrain.loggers.wandb_logger import WandbLogger
from mmtrain.run_dir import for_sweep_agent


def _agent_env(tmp_path: Path, run_id: str, **params) -> dict[str, str]:
    """What the agent puts in a run's environment (offline: no server to join)."""
    param_file = tmp_path / "wandb" / "sweep-swp42" / f"config-{run_id}.yaml"
    param_file.parent.mkdir(parents=True, exist_ok=True)
    param_file.write_text("wandb_version: 1\n\n" + "".join(f"{k}:\n  value: {v}\n" for k, v in params.items()))
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SWEEP_ID": "swp42", "WANDB_RUN_ID": run_id,
            "WANDB_SWEEP_PARAM_PATH": str(param_file), "WANDB_MODE": "offline"}


def test_output_dir_is_one_folder_per_agent_run(monkeypatch):
    cfg = load_config(TINY)
    assert for_sweep_agent(cfg) is cfg  # no agent: unchanged
    monkeypatch.setenv("WANDB_SWEEP_ID", "swp42")
    monkeypatch.setenv("WANDB_RUN_ID", "abc123")
    moved = for_sweep_agent(cfg)
    assert moved.train.output_dir == str(Path("runs/tiny/abc123")) and moved.optim == cfg.optim
    monkeypatch.setenv("WANDB_RUN_ID", "../x")
    assert for_sweep_agent(cfg) is cfg  # not a folder name: left alone


@pytest.mark.parametrize("agent", [False, True])
def test_wandb_init_joins_the_agents_run_and_passes_the_group(tmp_path, monkeypatch, agent):
    """Under the agent: no project, entity, id or mode forced (wandb takes the agent's); the group always."""
    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        return REAL_INIT(**{**kwargs, "mode": kwargs["mode"] or "offline"})  # online cannot run here

    monkeypatch.setattr(wandb, "init", init)
    if agent:
        monkeypatch.setenv("WANDB_SWEEP_ID", "swp42")
        monkeypatch.setenv("WANDB_RUN_ID", "agentrun1")
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # the agent is logged in: auto would mean online
    logger = WandbLogger(tmp_path, WandbConfig(group="my-sweep", project="p", entity="e"))
    logger.load_state_dict({"run_id": "fromckpt"})  # a checkpoint's run id: the agent's wins
    logger.open({"optim": {"lr": 0.1}}, resume_step=None)
    logger.close()
    (kwargs,) = calls
    assert kwargs["group"] == "my-sweep"
    if agent:
        assert (kwargs["project"], kwargs["entity"], kwargs["id"], kwargs["mode"]) == (None, None, None, None)
        assert logger.run_id == "agentrun1" and logger.mode == "offline"
    else:
        assert (kwargs["project"], kwargs["entity"], kwargs["id"], kwargs["mode"]) == ("p", "e", "fromckpt", "offline")
    (path,) = offline_runs(tmp_path)
    assert read_run(path)["run_id"] == ("agentrun1" if agent else "fromckpt")


@pytest.mark.slow
def test_two_agent_runs_share_the_default_output_dir_and_a_sigterm_saves_and_exits_0(tmp_path):
    """Two runs of one sweep command, as the agent starts them (same argv, same train.output_dir, their own
    WANDB_RUN_ID): each trains in its own folder. The second is stopped the way the agent's early
    termination stops it (SIGTERM): it saves a checkpoint and exits 0, so the agent counts it as finished."""
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "mmtrain", "train", "--config", str(TINY), "--wandb.mode", "auto",
           "--train.output_dir", str(out), "--wandb.media_samples", "0", "--optim.lr=0.002"]
    first = subprocess.Popen([*cmd, "--train.epochs", "1"], cwd=REPO, env=_agent_env(tmp_path, "run-a", **{
        "optim.lr": 0.002}), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen([*cmd, "--train.epochs", "40"], cwd=REPO, env=_agent_env(tmp_path, "run-b", **{
        "optim.lr": 0.002}), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics, deadline = out / "run-b" / "metrics.jsonl", time.monotonic() + 120
        while not (metrics.is_file() and any(r.get("step", 0) >= 2 for r in read_jsonl(metrics))):
            assert second.poll() is None and time.monotonic() < deadline, second.communicate()
            time.sleep(0.1)
        second.send_signal(signal.SIGTERM)
        out_b, err_b = second.communicate(timeout=120)
        out_a, err_a = first.communicate(timeout=120)
    finally:
        first.kill()
        second.kill()
    assert first.returncode == 0, out_a[-2000:] + err_a[-2000:]
    assert second.returncode == 0, out_b[-2000:] + err_b[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["run-a", "run-b"]
    assert "stopped by a signal" in out_b and list((out / "run-b" / "checkpoints").glob("step_*"))
    assert json.loads((out / "run-b" / "summary.json").read_text())["status"] == "preempted"
    assert json.loads((out / "run-a" / "summary.json").read_text())["final_validation_loss"] is not None
    for run_id in ("run-a", "run-b"):
        (path,) = offline_runs(out / run_id)
        run = read_run(path)
        assert run["run_id"] == run_id  # the agent's run id, though mmtrain passed none
        assert run["config"]["optim.lr"] == 0.002 and run["config"]["optim"]["lr"] == 0.002
        saved = (out / run_id / "config.yaml").read_text()
        assert f"output_dir: {out / run_id}" in saved  # the resolved config names the run's own folder
