"""``mmtrain sweep``: the W&B sweep YAML read and expanded, and the local runner (ledger, failures, parallel
trials, interruption and resume, the ranked table).

The runner's logic is tested with a stand-in program (a real subprocess, written below) that writes a
summary.json like a finished run; the end-to-end test runs real ``mmtrain train`` trials on configs/tiny.yaml.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from conftest import REPO, TINY
from wandb.proto import wandb_internal_pb2 as pb
from wandb_files import _payloads, offline_runs

from mmtrain import cli
from mmtrain.sweep import read_ledger
from mmtrain.sweep_spec import load_sweep

# A training program's stand-in: records each call, fails for optim.lr=0.3, kills itself with SIGKILL for 0.4 (as
# the OOM killer would), exits 3 silently for 0.5, runs FAKE_SLEEP seconds, saves and exits 0 on SIGTERM (summary
# status "preempted", as mmtrain does, noted as "stopped"), else writes the metric lr*10 + seed.
FAKE = r'''
import json, os, signal, sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
out = args["train.output_dir"]
def note(**kw):
    with open(os.path.join(out, "calls.jsonl"), "a") as f:
        f.write(json.dumps(kw) + "\n")
def summary(values):
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(values, f)
def stop(*_):
    note(stopped=time.time())
    summary({"status": "preempted"})
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
note(argv=sys.argv[1:], start=time.time(), accelerate=any(k.startswith("ACCELERATE_") for k in os.environ))
lr, seed = float(args.get("optim.lr", 0)), int(args.get("train.seed", 0))
if lr == 0.3:
    print("mmtrain: error: optim.lr=0.3 diverged", flush=True)
    sys.exit(1)
if lr == 0.4:
    os.kill(os.getpid(), signal.SIGKILL)
if lr == 0.5:
    sys.exit(3)
deadline = time.time() + float(os.environ.get("FAKE_SLEEP", "0"))
while time.time() < deadline:
    time.sleep(0.02)
summary({"final_validation_loss": lr * 10 + seed})
note(end=time.time())
'''


def _spec(tmp_path: Path, parameters: str, method: str = "grid", name: str = "fake", extra: str = "") -> Path:
    program = tmp_path / "fake_train.py"
    program.write_text(FAKE)
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nprogram: {program}\nmethod: {method}\n"
                    f"metric: {{name: final_validation_loss, goal: minimize}}\n{extra}"
                    f"parameters:\n{parameters}\n"
                    "command: ['${env}', '${interpreter}', '${program}', '${args}']\n")
    return path


def _sweep(*argv: str, capsys) -> tuple[int, str, str]:
    rc = cli.main(["sweep", *map(str, argv)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _calls(folder: Path) -> list[dict]:
    path = folder / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _starts(folder: Path) -> list[list[str]]:
    """The argv of each start of the fake program in ``folder``."""
    return [call["argv"] for call in _calls(folder) if "argv" in call]


# ------------------------------------------------------------------------------------------ the YAML

def test_sweep_yaml_grid_starts_with_two_lrs_times_three_seeds_and_expands_the_command():
    spec = load_sweep(REPO / "configs" / "sweep.yaml")
    assert (spec.method, spec.metric, spec.goal) == ("grid", "final_validation_loss", "minimize")
    grid = spec.grid()
    assert len(grid) == 5 * 4 * 3
    assert grid[:6] == [{"train.batch_size": 8, "optim.lr": lr, "train.seed": s} for lr in (0.0001, 0.0005)
                        for s in (0, 1, 2)]
    argv = spec.trial_argv(grid[4], Path("p.json"))
    assert argv == [sys.executable, "-m", "mmtrain", "train", "--train.batch_size=8", "--optim.lr=0.0005",
                    "--train.seed=1"]
    accelerate = load_sweep(REPO / "configs" / "sweep_accelerate.yaml")
    assert accelerate.grid() == grid
    assert accelerate.trial_argv(grid[0], Path("p.json"))[:5] == [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/multi_gpu.yaml"]


def test_macros_expand_as_the_agent_expands_them(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("method: grid\nprogram: train.py\nparameters: {optim.lr: {value: 0.001}, wandb.tags: "
                    "{value: [a, b]}}\ncommand: ['${env}', mmtrain, train, '${args_no_hyphens}', '${args_json}', "
                    "'--x=${envvar:SWEEP_TEST_VAR}', '${args_json_file}', '${program}']\n")
    os.environ["SWEEP_TEST_VAR"] = "v"
    try:
        argv = load_sweep(path).trial_argv({"optim.lr": 0.001, "wandb.tags": ["a", "b"]}, tmp_path / "p.json")
    finally:
        del os.environ["SWEEP_TEST_VAR"]
    assert argv == [sys.executable, "-m", "mmtrain", "train", "optim.lr=0.001", "wandb.tags=['a', 'b']",
                    '{"optim.lr": 0.001, "wandb.tags": ["a", "b"]}', "--x=v", str(tmp_path / "p.json"), "train.py"]


def test_random_draws_are_reproducible_and_follow_each_distribution(tmp_path):
    path = _spec(tmp_path, method="random", parameters="""\
  optim.lr: {distribution: log_uniform_values, min: 0.0001, max: 0.01}
  optim.weight_decay: {distribution: log_uniform, min: -9.2, max: -4.6}
  train.batch_size: {distribution: q_uniform, min: 8, max: 64, q: 8}
  train.seed: {min: 0, max: 3}
  optim.beta1: {distribution: uniform, min: 0.8, max: 0.95}
  optim.eps: {distribution: q_log_uniform_values, min: 1.0e-9, max: 1.0e-6, q: 1.0e-9}
  optim.max_grad_norm: {distribution: log_normal, mu: 0, sigma: 0.5}
  model.dropout: {distribution: beta, a: 2, b: 5}
  train.epochs: {values: [1, 2], probabilities: [1.0, 0.0]}
  optim.min_lr: {value: 0.0}""")
    spec = load_sweep(path)
    draws = [spec.sample(i, seed=7) for i in range(1, 201)]
    assert draws == [spec.sample(i, seed=7) for i in range(1, 201)]  # a re-run draws the same trials
    assert draws != [spec.sample(i, seed=8) for i in range(1, 201)]
    for d in draws:
        assert 1e-4 <= d["optim.lr"] <= 1e-2 and math.exp(-9.2) <= d["optim.weight_decay"] <= math.exp(-4.6)
        assert d["train.batch_size"] in range(8, 65, 8) and isinstance(d["train.batch_size"], int)
        assert d["train.seed"] in range(4) and 0.8 <= d["optim.beta1"] <= 0.95 and d["train.epochs"] == 1
        assert 0 < d["model.dropout"] < 1 and d["optim.max_grad_norm"] > 0 and d["optim.min_lr"] == 0.0
        assert abs(d["optim.eps"] / 1e-9 - round(d["optim.eps"] / 1e-9)) < 1e-6
    lrs = [math.log10(d["optim.lr"]) for d in draws]  # log-uniform: as many draws per decade
    assert 60 < sum(x < -3 for x in lrs) < 140
    assert len({d["train.seed"] for d in draws}) == 4


@pytest.mark.parametrize(("text", "expected"), [
    ("method: grid\nparameters: {optim.learning_rate: {values: [1]}}\ncommand: [x, '${args}']",
     "parameters.optim.learning_rate: 'optim.learning_rate' is not an mmtrain config field"),
    ("method: random\nparameters: {optim.lr: {distribution: cauchy, min: 0, max: 1}}\ncommand: [x, '${args}']",
     "parameters.optim.lr: unknown distribution 'cauchy'"),
    ("method: grid\nparameters: {optim: {parameters: {lr: {values: [1]}}}}\ncommand: [x, '${args}']",
     "parameters.optim: nested parameters are not supported"),
    ("method: grid\nparameters: {optim.lr: {parameters: {values: [1]}}}\ncommand: [x, '${args}']",
     "nested parameters are not supported"),
    ("method: grid\nparameters: {optim.lr: {values: [1]}}\ncommand: [x, y]", "command: has no ${args}"),
    ("method: grid\nparameters: {optim.lr: {min: 0.1, max: 0.2}}\ncommand: [x, '${args}']",
     "a grid needs discrete values"),
    ("method: bayes\nmetric: {name: m}\nparameters: {optim.lr: {distribution: normal}}\ncommand: [x, '${args}']",
     "bayes (Optuna TPE) searches bounded distributions only"),
    ("method: hyperband\nparameters: {optim.lr: {values: [1]}}", "method: 'hyperband': use grid, random or bayes"),
    ("method: random\nparameters: {optim.lr: {min: 0.1, max: 0.2}}\ncommand: [x, '${args}']",
     "method random needs --count N"),
    ("method: grid\nparameters: {optim.lr: {values: [0.1]}}\ncommand: [x, '${foo}', '${args}']",
     "unknown macro ${foo}"),
    ("method: grid\nparameters: {train.output_dir: {values: [a]}}\ncommand: [x, '${args}']",
     "the sweep gives each trial its own output_dir"),
    ("method: grid\nparameters: {optim.lr: {values: [1]}\n", "not valid YAML at line"),
    ("method: random\nrun_cap: five\nparameters: {optim.lr: {min: 0.1, max: 0.2}}\ncommand: [x, '${args}']",
     "run_cap: 'five' must be a whole number >= 1"),
    ("method: random\nrun_cap: 0\nparameters: {optim.lr: {min: 0.1, max: 0.2}}\ncommand: [x, '${args}']",
     "run_cap: 0 must be a whole number >= 1"),
])
def test_a_bad_sweep_file_is_one_line_naming_the_file_and_the_fix(tmp_path, capsys, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    rc, _, err = _sweep(path, "--out", tmp_path / "out", capsys=capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(f"mmtrain: error: {path}: ") and expected in err, err
    assert not (tmp_path / "out").exists()


def test_a_trial_config_mmtrain_would_refuse_stops_the_sweep_before_any_trial(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text("method: grid\nparameters: {train.batch_size: {values: [16, 0]}}\n"
                    "command: ['${interpreter}', -m, mmtrain, train, '${args}']\n")
    rc, _, err = _sweep(path, "--out", tmp_path / "out", "--", "--config", TINY, capsys=capsys)
    assert rc == 2 and "trial 2 (train.batch_size=0): " in err and "train.batch_size" in err
    assert not (tmp_path / "out").exists()  # nothing written, not even the ledger
    rc, _, err = _sweep(path, "--out", tmp_path / "out2", "--", "--train.batch_size=4", capsys=capsys)
    assert rc == 2 and "train.batch_size is set by the sweep" in err


# ---------------------------------------------------------------------------------------- the runner

def test_failed_trial_is_recorded_the_sweep_goes_on_and_a_rerun_skips_what_is_done(tmp_path, capsys):
    spec = _spec(tmp_path, "  optim.lr: {values: [0.1, 0.3, 0.2]}\n  train.seed: {values: [0, 1]}")
    out = tmp_path / "out"
    rc, stdout, _ = _sweep(spec, "--out", out, "--count", "5", "--", "--wandb.group=mine", "--train.epochs", "1",
                           capsys=capsys)
    assert rc == 1  # not every trial finished
    header, trials = read_ledger(out / "sweep.jsonl")
    assert header["spec_sha256"] == load_sweep(spec).digest and header["overrides"] == [
        "--wandb.group=mine", "--train.epochs=1"]
    assert [trials[i]["status"] for i in range(1, 6)] == ["finished", "finished", "failed", "failed", "finished"]
    assert trials[3]["returncode"] == 1 and trials[3]["error"] == "mmtrain: error: optim.lr=0.3 diverged"
    assert trials[2]["metric"] == pytest.approx(2.0) and trials[5]["params"] == {"optim.lr": 0.2, "train.seed": 0}
    assert "[3/5] trial-003 optim.lr=0.3 train.seed=0 -> failed" in stdout
    assert "[5/5] trial-005 optim.lr=0.2 train.seed=0 -> finished final_validation_loss=2 (" in stdout
    table = stdout[stdout.index("== sweep fake"):].splitlines()
    assert [line.split()[1] for line in table[2:]] == ["trial-001", "trial-002", "trial-005", "trial-003",
                                                       "trial-004"]
    assert table[2].split()[:4] == ["1", "trial-001", "finished", "1"]
    argv = _starts(out / "trial-001")[0]
    # the sweep's parameters, its folder and group, then the overrides (which come last and win)
    assert argv == ["--optim.lr=0.1", "--train.seed=0", f"--train.output_dir={out / 'trial-001'}",
                    "--wandb.group=fake", "--wandb.group=mine", "--train.epochs=1"]
    assert json.loads((out / "trial-001" / "sweep_params.json").read_text()) == {"optim.lr": 0.1, "train.seed": 0}

    rc, stdout, _ = _sweep(spec, "--out", out, "--count", "6", "--", "--wandb.group=mine", "--train.epochs", "1",
                           capsys=capsys)
    assert [len(_calls(out / f"trial-00{i}")) for i in range(1, 6)] == [2, 2, 1, 1, 2]  # nothing ran again
    assert "[1/6] trial-001 optim.lr=0.1 train.seed=0 -> finished (earlier) final_validation_loss=1" in stdout
    assert read_ledger(out / "sweep.jsonl")[1][6]["status"] == "finished"

    rc, stdout, _ = _sweep(spec, "--out", out, "--retry-failed", "--", "--wandb.group=mine", "--train.epochs", "1",
                           capsys=capsys)
    again = _starts(out / "trial-003")
    assert len(again) == 2 and again[1][-1] == "--train.resume=auto"
    assert read_ledger(out / "sweep.jsonl")[1][3]["attempt"] == 2

    rc, _, err = _sweep(spec, "--out", out, capsys=capsys)  # other overrides: another sweep
    assert rc == 2 and "was run with the overrides" in err
    spec.write_text(spec.read_text().replace("0.2]", "0.25]"))
    rc, _, err = _sweep(spec, "--out", out, "--", "--wandb.group=mine", "--train.epochs", "1", capsys=capsys)
    assert rc == 2 and "records another sweep spec" in err and "use another --out" in err


def test_parallel_runs_trials_at_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_SLEEP", "1.5")
    spec = _spec(tmp_path, "  optim.lr: {values: [0.1, 0.2]}")
    rc, _, _ = _sweep(spec, "--out", tmp_path / "out", "--parallel", "2", capsys=capsys)
    assert rc == 0
    (a_start, a_end), (b_start, b_end) = ((c[0]["start"], c[1]["end"]) for c in
                                          (_calls(tmp_path / "out" / f"trial-00{i}") for i in (1, 2)))
    assert a_start < b_end and b_start < a_end  # the two ran at the same time


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)


@pytest.mark.parametrize("launcher", ["python", "accelerate"])
def test_ctrl_c_stops_trials_which_a_rerun_continues_with_resume_auto(tmp_path, launcher):
    spec, out = _spec(tmp_path, "  optim.lr: {values: [0.1, 0.2]}"), tmp_path / "out"
    cmd = [sys.executable, "-m", "mmtrain", "sweep", str(spec), "--out", str(out), "--parallel", "2",
           "--launcher", launcher]
    env = {**os.environ, "FAKE_SLEEP": "120"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: all(_calls(out / f"trial-00{i}") for i in (1, 2)), proc)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1, stdout + stderr
    assert "stopping 2 running trial(s)" in stdout and "run the same command again to continue" in stdout
    trials = read_ledger(out / "sweep.jsonl")[1]
    assert [trials[i]["status"] for i in (1, 2)] == ["interrupted", "interrupted"]
    assert all(trials[i]["returncode"] == 0 for i in (1, 2))  # each saved and exited 0 (not killed)
    assert all(_calls(out / f"trial-00{i}")[0]["accelerate"] == (launcher == "accelerate") for i in (1, 2))

    done = subprocess.run(cmd, cwd=REPO, env={**env, "FAKE_SLEEP": "0"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    for i in (1, 2):
        assert _starts(out / f"trial-00{i}")[1][-1] == "--train.resume=auto"
    assert [read_ledger(out / "sweep.jsonl")[1][i]["status"] for i in (1, 2)] == ["finished", "finished"]


def test_random_and_bayes_sweeps_run_and_bayes_rebuilds_its_study_from_the_ledger(tmp_path, capsys):
    params = "  optim.lr: {distribution: uniform, min: 0.01, max: 0.2}\n  train.seed: {values: [0, 1]}"
    spec = _spec(tmp_path, params, method="random", name="rnd")
    rc, _, _ = _sweep(spec, "--out", tmp_path / "r", "--count", "3", "--seed", "5", capsys=capsys)
    trials = read_ledger(tmp_path / "r" / "sweep.jsonl")[1]
    assert rc == 0 and [trials[i]["params"] for i in (1, 2, 3)] == [load_sweep(spec).sample(i, 5) for i in (1, 2, 3)]

    spec = _spec(tmp_path, params, method="bayes", name="bys")
    rc, _, _ = _sweep(spec, "--out", tmp_path / "b", "--count", "4", capsys=capsys)
    header, trials = read_ledger(tmp_path / "b" / "sweep.jsonl")
    assert rc == 0 and [trials[i]["status"] for i in range(1, 5)] == ["finished"] * 4
    assert all(0.01 <= t["params"]["optim.lr"] <= 0.2 for t in trials.values())
    assert isinstance(header["seed"], int)
    rc, stdout, _ = _sweep(spec, "--out", tmp_path / "b", "--count", "5", capsys=capsys)
    assert rc == 0 and stdout.count("(earlier)") == 4 and "[5/5] trial-005" in stdout
    assert [len(_calls(tmp_path / "b" / f"trial-00{i}")) for i in range(1, 6)] == [2, 2, 2, 2, 2]


def test_count_beyond_the_grid_runs_the_grid(tmp_path, capsys):
    spec = _spec(tmp_path, "  optim.lr: {values: [0.1]}")
    rc, stdout, _ = _sweep(spec, "--out", tmp_path / "g", "--count", "9", capsys=capsys)
    assert rc == 0 and "grid, 1 trial(s)" in stdout and "[1/1] trial-001" in stdout



def test_a_continued_bayes_sweep_suggests_new_trials_not_the_first_ones_again(tmp_path, capsys):
    spec = _spec(tmp_path, "  optim.lr: {min: 0.01, max: 0.2}\n  train.seed: {values: [0, 1]}", method="bayes",
                 name="by")
    assert _sweep(spec, "--out", tmp_path / "b", "--count", "3", capsys=capsys)[0] == 0
    assert _sweep(spec, "--out", tmp_path / "b", "--count", "6", "--parallel", "2", capsys=capsys)[0] == 0
    trials = read_ledger(tmp_path / "b" / "sweep.jsonl")[1]
    lrs = [trials[i]["params"]["optim.lr"] for i in range(1, 7)]
    assert len(set(lrs)) == 6, lrs  # TPE's random start-up draws are not those of the first command again


def test_list_values_under_bayes_are_searched_without_optuna_warnings(tmp_path, capsys):
    spec = _spec(tmp_path, "  wandb.tags: {values: [[a, b], [c]]}\n  optim.lr: {min: 0.01, max: 0.2}",
                 method="bayes", name="tags")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, _, err = _sweep(spec, "--out", tmp_path / "t", "--count", "2", capsys=capsys)
        rc2, _, err2 = _sweep(spec, "--out", tmp_path / "t", "--count", "3", capsys=capsys)  # rebuilt from the ledger
    assert rc == rc2 == 0 and "Choices" not in err + err2, err + err2
    assert not [w for w in caught if "Choices" in str(w.message)]
    trials = read_ledger(tmp_path / "t" / "sweep.jsonl")[1]
    assert all(trials[i]["params"]["wandb.tags"] in (["a", "b"], ["c"]) for i in (1, 2, 3))
    assert f"--wandb.tags={trials[1]['params']['wandb.tags']}" in _starts(tmp_path / "t" / "trial-001")[0]


def test_a_trial_killed_by_a_signal_is_failed_naming_the_signal_and_retry_failed_resumes_it(tmp_path, capsys):
    spec, out = _spec(tmp_path, "  optim.lr: {values: [0.4, 0.5, 0.1]}"), tmp_path / "out"
    rc, stdout, _ = _sweep(spec, "--out", out, capsys=capsys)
    trials = read_ledger(out / "sweep.jsonl")[1]
    assert rc == 1 and [trials[i]["status"] for i in (1, 2, 3)] == ["failed", "failed", "finished"]
    assert trials[1]["returncode"] == -9 and trials[1]["error"] == "killed by SIGKILL (returncode -9; out of memory?)"
    assert "trial-001 optim.lr=0.4 -> failed" in stdout and "killed by SIGKILL" in stdout
    # not the sweep's own header line of train.log
    assert trials[2]["returncode"] == 3 and trials[2]["error"] == "exited with returncode 3, printing nothing"
    rc, _, _ = _sweep(spec, "--out", out, "--retry-failed", capsys=capsys)
    assert _starts(out / "trial-001")[-1][-1] == "--train.resume=auto"
    assert read_ledger(out / "sweep.jsonl")[1][1]["attempt"] == 2


def test_a_ledger_line_torn_by_a_kill_does_not_swallow_the_next_one(tmp_path, capsys):
    spec, out = _spec(tmp_path, "  optim.lr: {values: [0.1, 0.2]}"), tmp_path / "out"
    assert _sweep(spec, "--out", out, "--count", "1", capsys=capsys)[0] == 0
    torn = '{"trial": 2, "params": {"optim.l'
    with (out / "sweep.jsonl").open("a") as f:  # a sweep killed in the middle of a line
        f.write(torn)
    assert _sweep(spec, "--out", out, capsys=capsys)[0] == 0
    records = []
    for line in (out / "sweep.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            assert line == torn
    assert [r["status"] for r in records if r.get("trial") == 2] == ["started", "finished"]


@pytest.mark.parametrize("under", ["", "sub"])
def test_out_naming_a_file_is_one_line(tmp_path, capsys, under):
    spec, afile = _spec(tmp_path, "  optim.lr: {values: [0.1]}"), tmp_path / "afile"
    afile.write_text("x")
    rc, _, err = _sweep(spec, "--out", afile / under if under else afile, capsys=capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith(f"mmtrain: error: --out {afile}"), err
    assert "is a file" in err and afile.read_text() == "x"


# ------------------------------------------------------------------- a killed sweep, a second sweep

def _trial_processes(out: Path) -> list[int]:
    """Live processes of the trials in ``out`` (their command names a trial folder): trainers, launchers."""
    import psutil

    mark, found = str(out / "trial-"), []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and any(mark in a for a in p.info["cmdline"] or ()):
            found.append(p.pid)
    return found


def _sweep_cmd(spec: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mmtrain", "sweep", str(spec), "--out", str(out), *extra]


@pytest.mark.skipif(sys.platform != "linux", reason="trials die with their sweep by PR_SET_PDEATHSIG (Linux)")
@pytest.mark.parametrize("launcher", ["python", "accelerate"])
def test_a_killed_sweep_takes_its_trials_with_it_and_a_rerun_continues_them(tmp_path, launcher):
    """kill -9 (or the OOM killer) of the sweep alone: each trial is sent SIGTERM as its sweep dies, saves and
    exits (with accelerate, the launcher and its training process); the re-run, started at once, waits for them,
    then continues them from their checkpoint, one copy per folder."""
    spec, out = _spec(tmp_path, "  optim.lr: {values: [0.1, 0.2]}"), tmp_path / "out"
    cmd = _sweep_cmd(spec, out, "--parallel", "2", "--launcher", launcher)
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "FAKE_SLEEP": "120"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: all(_calls(out / f"trial-00{i}") for i in (1, 2)), proc)
        proc.kill()
        proc.communicate()
        again = subprocess.run(cmd, cwd=REPO, env={**os.environ, "FAKE_SLEEP": "0"}, capture_output=True, text=True,
                               timeout=120)
    finally:
        proc.kill()
        for pid in _trial_processes(out):
            os.kill(pid, signal.SIGKILL)
    assert again.returncode == 0, again.stdout + again.stderr
    for i in (1, 2):
        calls = _calls(out / f"trial-00{i}")
        assert [next(iter(c)) for c in calls] == ["argv", "stopped", "argv", "end"], calls
        assert calls[1]["stopped"] < calls[2]["start"] and calls[2]["argv"][-1] == "--train.resume=auto"
    assert not _trial_processes(out)


@pytest.mark.skipif(sys.platform != "linux", reason="trials die with their sweep by PR_SET_PDEATHSIG (Linux)")
def test_a_hangup_stops_the_trials_like_ctrl_c_even_with_the_terminal_gone(tmp_path):
    spec, out = _spec(tmp_path, "  optim.lr: {values: [0.1, 0.2]}"), tmp_path / "out"
    proc = subprocess.Popen(_sweep_cmd(spec, out, "--parallel", "2"), cwd=REPO,
                            env={**os.environ, "FAKE_SLEEP": "120"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: all(_calls(out / f"trial-00{i}") for i in (1, 2)), proc)
        proc.stdout.close()  # the terminal is gone: what the sweep prints next goes nowhere (EPIPE here, EIO on a tty)
        proc.send_signal(signal.SIGHUP)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        for pid in _trial_processes(out):
            os.kill(pid, signal.SIGKILL)
    trials = read_ledger(out / "sweep.jsonl")[1]
    assert [(trials[i]["status"], trials[i]["returncode"]) for i in (1, 2)] == [("interrupted", 0)] * 2, \
        proc.stderr.read()
    assert all("stopped" in _calls(out / f"trial-00{i}")[-1] for i in (1, 2))


def test_under_nohup_a_hangup_leaves_the_sweep_running(tmp_path):
    spec, out = _spec(tmp_path, "  optim.lr: {values: [0.1, 0.2]}"), tmp_path / "out"
    proc = subprocess.Popen(_sweep_cmd(spec, out), cwd=REPO, env={**os.environ, "FAKE_SLEEP": "2"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))  # as nohup does
    try:
        _wait_for(lambda: _calls(out / "trial-001"), proc)
        proc.send_signal(signal.SIGHUP)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stdout + stderr
    assert [read_ledger(out / "sweep.jsonl")[1][i]["status"] for i in (1, 2)] == ["finished", "finished"]

def test_a_second_sweep_on_the_same_folder_is_refused(tmp_path, capsys):
    spec, out = _spec(tmp_path, "  optim.lr: {values: [0.1, 0.2]}"), tmp_path / "out"
    proc = subprocess.Popen(_sweep_cmd(spec, out), cwd=REPO, env={**os.environ, "FAKE_SLEEP": "120"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _calls(out / "trial-001"), proc)
        rc, _, err = _sweep(spec, "--out", out, capsys=capsys)
        assert rc == 2 and err.count("\n") == 1, err
        assert err.startswith(f"mmtrain: error: {out} is in use by another mmtrain sweep (pid {proc.pid})"), err
        assert len(_calls(out / "trial-001")) == 1 and not (out / "trial-002").exists()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1 and read_ledger(out / "sweep.jsonl")[1][1]["status"] == "interrupted", stdout + stderr


def test_trials_an_earlier_sweep_left_running_hold_their_folder_until_they_end(tmp_path, capsys, monkeypatch):
    """Where nothing stopped them with their sweep (no PR_SET_PDEATHSIG, or a trial that ignores SIGTERM), a
    re-run waits for them a while, then refuses rather than start a second copy in the same folder."""
    import psutil

    spec, out = _spec(tmp_path, "  optim.lr: {values: [0.1, 0.2]}"), tmp_path / "out"
    assert _sweep(spec, "--out", out, "--count", "1", capsys=capsys)[0] == 0
    folder = out / "trial-002"  # trial 2 as a SIGKILLed sweep leaves it: started, still running, its own session
    folder.mkdir()
    orphan = subprocess.Popen([sys.executable, str(tmp_path / "fake_train.py"), "--optim.lr=0.2",
                               f"--train.output_dir={folder}"], env={**os.environ, "FAKE_SLEEP": "120"},
                              start_new_session=True)
    try:
        _wait_for(lambda: _calls(folder), orphan)
        with (out / "sweep.jsonl").open("a") as f:
            f.write(json.dumps({"trial": 2, "params": {"optim.lr": 0.2}, "status": "started", "output_dir": str(folder),
                                "attempt": 1, "pid": orphan.pid,
                                "pid_created": psutil.Process(orphan.pid).create_time()}) + "\n")
        monkeypatch.setattr("mmtrain.sweep_ledger.ORPHAN_WAIT", 1.0)
        rc, stdout, err = _sweep(spec, "--out", out, capsys=capsys)
        assert rc == 2 and err.count("\n") == 1 and f"trial-002 (pid {orphan.pid})" in err, err
        assert "waiting" in stdout and len(_calls(folder)) == 1
    finally:
        orphan.terminate()
        orphan.wait()
    rc, stdout, err = _sweep(spec, "--out", out, capsys=capsys)
    assert rc == 0 and _starts(folder)[-1][-1] == "--train.resume=auto", stdout + err


# ------------------------------------------------------------------------------------- end to end

def _groups(output_dir: Path) -> list[str]:
    """The W&B group of each offline run (attempt) in a run folder."""
    groups = []
    for path in offline_runs(output_dir):
        for payload in _payloads(path.read_bytes()):
            record = pb.Record()
            record.ParseFromString(payload)
            if record.WhichOneof("record_type") == "run":
                groups.append(record.run.run_group)
    return groups


@pytest.mark.slow
def test_real_trials_interrupted_continued_and_skipped(tmp_path):
    """configs/sweep.yaml's first two grid points as real `mmtrain train` trials on the tiny config: stopped
    by Ctrl-C during trial 1, continued from its checkpoint, then a third run skips both."""
    out = tmp_path / "S"
    cmd = [sys.executable, "-m", "mmtrain", "sweep", "configs/sweep.yaml", "--count", "2", "--out", str(out), "--",
           "--config", str(TINY), "--train.epochs", "2", "--wandb.media_samples", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "trial-001" / "metrics.jsonl"
    try:
        _wait_for(lambda: metrics.is_file() and '"step": 2' in metrics.read_text(), proc, timeout=120)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1 and "[1/2] trial-001 train.batch_size=8 optim.lr=0.0001 train.seed=0 -> interrupted" \
        in stdout, stdout + stderr
    assert list((out / "trial-001" / "checkpoints").glob("step_*"))  # it saved before exiting
    assert json.loads((out / "trial-001" / "summary.json").read_text())["status"] == "preempted"

    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    log = (out / "trial-001" / "train.log").read_text()
    assert "mmtrain: resuming from" in log and log.count("== mmtrain sweep: trial 1, attempt") == 2
    trials = read_ledger(out / "sweep.jsonl")[1]
    for i in (1, 2):
        summary = json.loads((out / f"trial-00{i}" / "summary.json").read_text())
        assert trials[i]["status"] == "finished" and trials[i]["metric"] == summary["final_validation_loss"]
        assert _groups(out / f"trial-00{i}") == ["hyperparameter-sensitivity"] * (2 if i == 1 else 1)
    assert trials[2]["params"] == {"train.batch_size": 8, "optim.lr": 0.0001, "train.seed": 1}
    assert "== sweep hyperparameter-sensitivity: 2 of 2 trial(s) finished" in done.stdout

    lines = (out / "sweep.jsonl").read_text().count("\n")
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.count("-> finished (earlier)") == 2, again.stdout + again.stderr
    assert (out / "sweep.jsonl").read_text().count("\n") == lines  # nothing started
