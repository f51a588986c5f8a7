"""Elastic resume: a checkpoint continues with another number of processes and another split of the
same effective batch (per-device batch x processes x accumulation), and the out-of-memory message
prints a command that continues the run.

The chain is real `mmtrain train` processes (tests/fault_run.py: SIGKILL at a step boundary, an
injected OOM, a per-rank record of every sample trained); the 2-process part is a real gloo group
under `accelerate launch`. The rest are in-process checks of the pieces (data position arithmetic,
window merge, RNG derivation, the printed command).
"""

import collections
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY, read_jsonl, reset_accelerate
from test_checkpoint import _hashes
from test_resume import _env, _resumed_from, _steps, _train
from wandb_files import offline_runs, read_run

from mmtrain.checkpoint import Resharding, RNGState, capture_rng, derived_rng_seed
from mmtrain.data import resumed_position
from mmtrain.errors import CheckpointError
from mmtrain.resilience import OutOfMemory
from mmtrain.windows import Window, Windows, combine

# tiny: 96 training samples. Every layout below has an effective batch of 32: 3 optimizer steps per
# epoch, 6 in the run; a checkpoint every 2 steps plus one at each epoch end. One process trains 32
# per micro-batch, two train 16 each; with model.global_alignment (the default) the 2-process
# InfoNCE contrasts each sample with all 32 of the round, so both layouts optimise the same
# objective on the same samples per step. Dropout off: see LOSS_TOLERANCE.
ARGS = ["--config", str(TINY), "--wandb.log_frequency", "1", "--wandb.media_samples", "0",
        "--checkpoint.every_steps", "2", "--model.dropout", "0"]
ONE = [*ARGS, "--train.batch_size", "32"]
TWO = [*ARGS, "--train.batch_size", "16"]
SAMPLES_PER_EPOCH = 96
# With dropout off, nothing random is drawn in training, and a round of 32 samples is one micro-batch
# of 32 on one process or two of 16 whose gradients DDP averages: the same mathematics, summed in
# another order (the all-reduce, the InfoNCE over gathered features), which Adam's normalisation
# amplifies in the small gradients. Observed (2-core CPU, torch 2.14): up to 5e-5 relative
# (loss_alignment). 5e-4 leaves 10x for other builds and is below the smallest step-to-step change of
# every loss in this run (1.4e-3), so a step trained on other data, weights or learning rate shows.
LOSS_TOLERANCE = 5e-4
COMPARED = ("total_loss", "loss_image", "loss_caption", "loss_alignment", "val/total_loss", "epoch_train_loss_avg")


def _trained(samples: Path) -> list[dict]:
    """Every micro-batch any rank of any attempt trained (fault_run.py's MMTRAIN_SAMPLES records)."""
    return [row for path in sorted(samples.glob("*.jsonl")) for row in read_jsonl(path)]


def _per_step(rows: list[dict]) -> dict[int, collections.Counter]:
    steps: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for row in rows:
        steps[row["step"]].update(row["samples"])
    return steps


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """The uninterrupted run: one process, micro-batches of 32; every checkpoint kept."""
    root = tmp_path_factory.mktemp("elastic-reference")
    samples = root / "samples"
    samples.mkdir()
    _train(root / "run", [*ONE, "--wandb.mode", "disabled", "--checkpoint.keep_last", "10"],
           MMTRAIN_SAMPLES=str(samples))
    return root / "run", samples


@pytest.mark.slow
def test_one_to_two_to_one_process_continues_the_same_samples_and_losses(reference, tmp_path):
    ref_out, ref_samples = reference
    out, samples = tmp_path / "run", tmp_path / "samples"
    # The first attempt: one process, stopped after step 2 (64 of epoch 0's 96 samples trained). The
    # reference's own first two steps are that attempt (one process is deterministic): its folder as
    # it was at step 2, and its sample records up to there.
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref_out / "checkpoints" / "step_00000002", out / "checkpoints" / "step_00000002")
    shutil.copy(ref_out / "config.yaml", out / "config.yaml")
    shutil.copy(ref_out / "metrics.jsonl", out / "metrics.jsonl")  # cut back to step 2 by the resume
    samples.mkdir()
    (samples / "first.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _trained(ref_samples)
                                                 if r["step"] <= 2))
    # 2 processes of 16: step 3 (epoch 0's last 32), then step 4 (epoch 1's first 32); killed there.
    b = _train(out, [*TWO, "--wandb.mode", "disabled"], processes=2, expect=None, resume=True,
               MMTRAIN_KILL="after_step:4", MMTRAIN_SAMPLES=str(samples))
    assert b.returncode != 0 and _resumed_from(b) == 2, b.stdout[-3000:] + b.stderr[-3000:]
    assert "processes: 1 -> 2" in b.stdout and "epoch 0 + 2 batches" in b.stdout  # 64 samples = 2 x 16 x 2
    # 1 process again, from step 4 (written by 2 processes), to the end.
    c = _train(out, [*ONE, "--wandb.mode", "offline"], resume=True, MMTRAIN_SAMPLES=str(samples))
    assert _resumed_from(c) == 4 and "epoch 1 + 1 batches" in c.stdout and "training finished" in c.stdout

    # train_state.json records the layout that wrote each checkpoint (every_steps 2, epoch ends 3, 6).
    layouts = {step: json.loads((out / "checkpoints" / f"step_{step:08d}" / "train_state.json").read_text())
               for step in _steps(out)}
    assert {s: m["world_size"] for s, m in layouts.items()} == {3: 2, 4: 2, 6: 1}  # keep_last 3
    # Each attempt wrote only the steps it trained: every one of the 6 steps exactly once.
    trained = _trained(samples)
    assert sorted({r["step"] for r in trained}) == list(range(1, 7))
    # Every sample of each epoch exactly once across both cuts, and each optimizer step trained the
    # same 32 samples as the uninterrupted run (the sampler's order does not depend on the layout).
    for epoch in (0, 1):
        seen = collections.Counter(k for r in trained if r["epoch"] == epoch for k in r["samples"])
        assert sum(seen.values()) == SAMPLES_PER_EPOCH and set(seen.values()) == {1}, epoch
    assert _per_step(trained) == _per_step(_trained(ref_samples))

    ref = {r["step"]: r for r in read_jsonl(ref_out / "metrics.jsonl")}
    got = {r["step"]: r for r in read_jsonl(out / "metrics.jsonl")}
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    for step in ref:
        for key in COMPARED:
            if key in ref[step]:
                assert got[step][key] == pytest.approx(ref[step][key], rel=LOSS_TOLERANCE), (step, key)
        assert got[step]["samples_seen"] == ref[step]["samples_seen"] == 32 * step
        assert got[step]["learning_rate"] == pytest.approx(ref[step]["learning_rate"], rel=1e-12)
    # The epoch windows crossed the cuts whole: the saved ranks' sums and counts were merged, and
    # micro-batches weigh by their samples, so the epoch mean is over every sample of the epoch (steps
    # 1-2: one micro-batch of 32 each; step 3: two of 16): the mean of its three 32-sample steps.
    assert got[3]["epoch_train_loss_avg"] == pytest.approx(
        (got[1]["total_loss"] + got[2]["total_loss"] + got[3]["total_loss"]) / 3, rel=1e-9)
    assert got[6]["epoch_train_loss_avg"] == pytest.approx(
        (got[4]["total_loss"] + got[5]["total_loss"] + got[6]["total_loss"]) / 3, rel=1e-9)
    # The run config of this attempt records its own layout.
    (run,) = [read_run(p) for p in offline_runs(out)]
    assert run["config"]["world_size"] == 1 and run["config"]["effective_batch_size"] == 32
    assert run["config"]["per_device_batch_size"] == 32


@pytest.mark.slow
def test_out_of_memory_prints_a_command_that_continues_the_run(tmp_path, capsys):
    """1 process, micro-batches of 16, 6 steps: OOM in step 3 (checkpoint at 2). The message's last
    sentence is a complete command line: run as printed (its python made this test's), it continues
    at the checkpoint with micro-batches of 8 and finishes the run. Then a changed effective batch is
    refused and nothing in the folder is touched."""
    out = tmp_path / "run w space"
    args = [*ARGS, "--wandb.mode", "disabled", "--train.epochs", "1", "--train.batch_size=16", "--train.resume",
            "none"]
    samples = tmp_path / "samples"
    samples.mkdir()
    failed = _train(out, args, expect=1, MMTRAIN_OOM="3", MMTRAIN_SAMPLES=str(samples))
    err = failed.stderr
    assert "out of memory" in err and "Traceback" not in err
    command = shlex.split(err.split("Continue with: ", 1)[1].strip().splitlines()[0])
    assert command[0] in ("python", sys.executable) and command[1] == str(REPO / "tests" / "fault_run.py")
    # The fix replaced the flags the command already had (both forms), and added the others once.
    assert command.count("--train.resume") == 1 and command[command.index("--train.resume") + 1] == "auto"
    assert not any(word.startswith("--train.batch_size=") for word in command)
    assert command[command.index("--train.batch_size") + 1] == "8"
    assert command[command.index("--train.gradient_accumulation_steps") + 1] == "2"
    assert command[command.index("--train.output_dir") + 1] == str(out)
    done = subprocess.run([sys.executable, *command[1:]], cwd=REPO, env=_env(MMTRAIN_SAMPLES=str(samples)),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _resumed_from(done) == 2 and "epoch 0 + 4 batches" in done.stdout  # 2 x 16 samples = 4 x 8
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records if "total_loss" in r] == list(range(1, 7))  # 6 steps per epoch, as before
    assert json.loads((out / "summary.json").read_text())["optimizer_steps"] == 6
    seen = collections.Counter(k for r in _trained(samples) for k in r["samples"])
    assert sum(seen.values()) == SAMPLES_PER_EPOCH and set(seen.values()) == {1}  # across the cut: each once

    # A different effective batch is refused, with the saved layout's arithmetic on the left.
    before = _hashes(out)
    from mmtrain.cli import main

    code = main(["train", *args[:-2], "--train.output_dir", str(out), "--train.resume", "auto",
                 "--train.batch_size", "4"])
    reset_accelerate()
    assert code == 2 and "8 x 1 x 2 = 16 -> 4 x 1 x 1 = 4" in capsys.readouterr().err
    assert _hashes(out) == before


def test_a_split_over_another_process_count_is_the_same_run_and_another_effective_batch_is_not():
    from mmtrain.config import load_config
    from mmtrain.run_dir import config_differences

    saved = load_config(TINY, {"train.batch_size": "16", "train.gradient_accumulation_steps": "2"}).to_dict()
    now = load_config(TINY, {"train.batch_size": "8", "train.gradient_accumulation_steps": "2"})
    assert config_differences(saved, now, processes=4, saved_processes=2)[0] == []  # 64 = 64
    blocking, _ = config_differences(saved, now, processes=1, saved_processes=2)
    assert blocking == ["effective batch (train.batch_size x processes x train.gradient_accumulation_steps): "
                        "16 x 2 x 2 = 64 -> 8 x 1 x 2 = 16"]
    # A run with no checkpoint yet has no data position: it may start over with another effective batch.
    assert config_differences(saved, now, processes=1, saved_processes=2, effective_batch=False)[0] == []
    # A checkpoint written before model.global_alignment existed (and one that had it off) resumes:
    # which negatives the loss sees is not what makes a run (a batch split changes them too).
    del saved["model"]["global_alignment"]
    blocking, other = config_differences(saved, now, processes=4, saved_processes=2)
    assert blocking == [] and "model.global_alignment: None -> True" in other
    # So does one from before data.decode_cache, or with the cache switched: the same samples either way.
    del saved["data"]["decode_cache"]
    blocking, other = config_differences(saved, now, processes=4, saved_processes=2)
    assert blocking == [] and "data.decode_cache: None -> 'auto'" in other


# ------------------------------------------------------------------------------------ the pieces


@pytest.mark.parametrize("samples", [96, 97, 100, 4627])
def test_steps_per_epoch_depend_only_on_the_effective_batch(samples):
    """Accelerate's sharded batch sampler (even batches) gives each rank ceil(N / (B W)) micro-batches,
    so ceil(that / A) optimizer steps = ceil(N / E) for every split E = B x W x A."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    from mmtrain.optim import optimizer_steps

    for effective in (32, 64):
        steps = set()
        for batch, world in ((1, 1), (4, 2), (8, 4), (16, 1), (16, 2), (32, 1), (8, 8), (2, 16)):
            if effective % (batch * world):
                continue
            shard = BatchSamplerShard(BatchSampler(range(samples), batch, drop_last=False), world, 0)
            steps.add(optimizer_steps(len(shard), effective // (batch * world), 1, 0)[0])
        assert steps == {-(-samples // effective)}, (effective, steps)


def test_the_data_position_converts_to_any_split_of_the_same_effective_batch(tmp_path):
    # 2 ranks x 16, 2 micro-batches each = 64 samples; 1 rank x 8 continues at micro-batch 8.
    assert resumed_position(tmp_path, 2, 16, 2, 8, 1, 96, 12) == 8
    assert resumed_position(tmp_path, 8, 8, 1, 16, 2, 96, 3) == 2
    assert resumed_position(tmp_path, 4, 16, 8, 32, 4, 4096, 32) == 4  # 8 GPUs -> 4 with twice the batch
    assert resumed_position(tmp_path, 3, 16, 2, 32, 1, 96, 3) == 3  # the epoch's end stays its end
    assert resumed_position(tmp_path, 2, 16, 2, 16, 2, 96, 3) == 2  # the same layout: as saved
    with pytest.raises(CheckpointError) as refused:
        resumed_position(tmp_path, 1, 16, 2, 24, 1, 96, 4)  # 32 samples are not whole batches of 24
    assert "1 batches x train.batch_size 16 x 2 process(es) = 32 samples" in str(refused.value)
    assert "train.batch_size 24 x 1 process(es) = 24 samples" in str(refused.value)


def _window(losses: list[float], grad_norm: float) -> Window:
    window = Window(torch.device("cpu"))
    for value in losses:
        window.add_micro_batch({k: torch.tensor(value) for k in ("total_loss", "loss_image", "loss_caption",
                                                                   "loss_alignment")}, 16)
    window.add_optimizer_step(torch.tensor(grad_norm), 1.0)
    return window


def _row(window: Window) -> dict:
    from mmtrain.distributed import gather_named

    return gather_named(None, window.columns())[0]


def test_windows_of_several_ranks_merge_into_rank_0_keeping_every_sum_and_count():
    saved = [Windows(torch.device("cpu")) for _ in range(2)]
    saved[0].log, saved[1].log = _window([1.0, 2.0], 3.0), _window([4.0, 8.0], 3.0)
    saved[0].epoch, saved[1].epoch = _window([1.0], 3.0), _window([5.0], 3.0)
    states = [w.state_dict() for w in saved]
    expected = combine([_row(saved[0].log), _row(saved[1].log)])
    merged = []
    for rank in (0, 1, 2):
        windows = Windows(torch.device("cpu"))
        windows.load_resharded_state(states, Resharding(2, 3, rank, seed=1, step=7))
        merged.append(windows)
    assert merged[0].log.micro_batches == 4 and merged[0].log.samples == 64 and merged[0].log.optimizer_steps == 1
    assert merged[1].log.micro_batches == merged[2].epoch.micro_batches == 0
    got = combine([_row(w.log) for w in merged])
    assert got["total_loss"] == pytest.approx(3.75) and got == pytest.approx(expected)
    assert combine([_row(w.epoch) for w in merged])["total_loss"] == pytest.approx(3.0)


def test_rng_streams_are_rederived_from_seed_step_and_rank():
    state = RNGState()
    draws = {}
    for rank in (0, 1):
        for _ in range(2):  # the same (seed, step, rank) twice: the same stream
            state.load_resharded_state([capture_rng()], Resharding(2, 1, rank, seed=42, step=10))
            draws.setdefault(rank, []).append((torch.rand(3).tolist(), __import__("random").random(),
                                               __import__("numpy").random.rand()))
    assert draws[0][0] == draws[0][1] and draws[1][0] == draws[1][1] and draws[0][0] != draws[1][0]
    assert len({derived_rng_seed(42, step, rank) for step in range(50) for rank in range(8)}) == 400


def _command(argv: list[str], env: dict | None = None, launcher: list[str] | None = None) -> str:
    flags = ["--train.batch_size", "8", "--train.gradient_accumulation_steps", "2", "--train.resume", "auto"]
    return OutOfMemory.continue_command(flags, argv, env or {}, launcher)


def test_the_printed_command_replaces_the_fix_flags_in_either_form():
    main = str(REPO / "mmtrain" / "__main__.py")
    text = _command([main, "train", "--config", "my run.yaml", "--train.batch_size=16", "--wandb.name", "-x",
                     "--train.resume", "none"])
    assert text.endswith("-m mmtrain train --config 'my run.yaml' --wandb.name -x --train.batch_size 8 "
                         "--train.gradient_accumulation_steps 2 --train.resume auto")
    assert shlex.split(text.split(": ", 1)[1])[0] in ("python", sys.executable)
    # A value that looks like a replaced flag is a value, not that flag.
    text = _command([main, "train", "--wandb.notes", "--train.batch_size", "--train.gradient_accumulation_steps",
                     "3"])
    assert "--wandb.notes --train.batch_size --train.batch_size 8 --train.gradient_accumulation_steps 2" in text
    # Under `accelerate launch` on one node: the launcher's own command line, read from the parent.
    worker = [main, "train", "--config", "c.yaml", "--train.batch_size", "16"]
    launcher = ["/usr/bin/python3", "/nonexistent/accelerate", "launch", "--multi_gpu", "--num_processes", "2",
                "-m", "mmtrain", "train", "--config", "c.yaml", "--train.batch_size", "16"]
    env = {"LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    assert _command(worker, env, launcher) == (
        "Continue with: /usr/bin/python3 /nonexistent/accelerate launch --multi_gpu --num_processes 2 -m mmtrain "
        "train --config c.yaml --train.batch_size 8 --train.gradient_accumulation_steps 2 --train.resume auto")
    # accelerate's one-process launcher sets no LOCAL_RANK but exports its settings: its command line too
    # (printing `python -m mmtrain ...` instead would drop its --mixed_precision bf16).
    one = ["/usr/bin/python3", "/nonexistent/accelerate", "launch", "--num_processes", "1", "--mixed_precision",
           "bf16", "-m", "mmtrain", "train", "--config", "c.yaml", "--train.batch_size", "16"]
    assert _command(worker, {"ACCELERATE_MIXED_PRECISION": "bf16"}, one).startswith(
        "Continue with: /usr/bin/python3 /nonexistent/accelerate launch --num_processes 1 --mixed_precision bf16 ")
    # Several nodes (or a parent that is not the launcher): the mmtrain part, to run under the same launcher.
    several = _command(worker, {**env, "WORLD_SIZE": "4"}, launcher)
    assert several.startswith("Continue with the same launcher and its options (on every node), followed by: "
                              "-m mmtrain train --config c.yaml --train.batch_size 8")
