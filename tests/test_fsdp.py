"""FSDP2, correct and not just running: real 2-process runs on CPU/gloo through
``accelerate launch --config_file accelerate_configs/fsdp.yaml``, compared with DDP.

Three runs of configs/tiny.yaml (2 epochs, 6 optimizer steps, a checkpoint every 2 steps, a NaN loss
injected at step 3 so the non-finite guard's fused-AdamW skip runs on sharded parameters): FSDP and
DDP from scratch, side by side; then FSDP resumed from its step-2 checkpoint. fp32
(train.mixed_precision no), so FSDP and DDP differ only in the order of float reductions. The
conversions between the two checkpoint layouts are checked in-process below.
"""

import math
import os
import pickle
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY, read_jsonl
from expected_metrics import assert_every_metric
from test_resume import LAUNCH_2, NOT_REPRODUCIBLE, _env

from mmtrain.errors import CheckpointError, ConfigError
from mmtrain.metrics import grad_stats

ARGS = [str(REPO / "tests" / "fault_run.py"), "--config", str(TINY), "--wandb.log_frequency", "1",
        "--wandb.image_log_frequency", "2", "--checkpoint.every_steps", "2", "--checkpoint.keep_last", "5",
        "--train.mixed_precision", "no"]  # fp32 on both sides (fsdp.yaml asks for bf16: train.mixed_precision auto)
FSDP_LAUNCH = [shutil.which("accelerate") or "accelerate", "launch", "--config_file",
               str(REPO / "accelerate_configs" / "fsdp.yaml"), "--num_processes", "2"]
NAN_STEP = 3
GRAD_KEYS = ("grad_norm", "grad_norm_max", "grad_norm_clipped", "grad_mean", "grad_std", "grad_max",
             "grad_norm/image_encoder", "grad_norm/image_decoder", "grad_norm/caption_decoder", "grad_norm/alignment")


# The runs compared with the first FSDP run need only metrics.jsonl: no W&B service to start.
NO_WANDB = ["--wandb.mode", "disabled"]


def _run_together(*runs: tuple[list[str], int, Path, list[str]]) -> list[str]:
    """Start every (launcher, port, output dir, extra arguments) at once (the launches' start-up
    is mostly single-threaded imports) and wait for all; returns their stdout."""
    procs = [subprocess.Popen([*launcher, "--main_process_port", str(port), *ARGS, "--train.output_dir", str(out),
                               *(["--train.resume", "auto"] if (out / "checkpoints").is_dir() else []), *extra],
                              cwd=REPO, env=_env(MMTRAIN_NAN=str(NAN_STEP)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for launcher, port, out, extra in runs]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return [stdout for stdout, _ in outputs]


def _resume_copy(source: Path, out: Path, step: int) -> Path:
    """A run folder holding only ``source``'s checkpoint of ``step``: resume auto starts there."""
    name = f"step_{step:08d}"
    shutil.copytree(source / "checkpoints" / name, out / "checkpoints" / name)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp")
    fsdp, ddp = root / "fsdp", root / "ddp"
    _run_together((FSDP_LAUNCH, 29541, fsdp, []), (LAUNCH_2, 29542, ddp, NO_WANDB))
    resumed = _resume_copy(fsdp, root / "resumed", 2)
    log, = _run_together((FSDP_LAUNCH, 29543, resumed, NO_WANDB))
    assert "resuming from" in log and "optimizer step 2," in log
    return {"fsdp": fsdp, "ddp": ddp, "resumed": resumed}


def _by_step(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_jsonl(out / "metrics.jsonl") if "grad_norm" in r or "val/total_loss" in r}


def _close(a: float | None, b: float | None, rel: float) -> bool:
    """Equal within ``rel``, or both non-finite (a NaN is written to metrics.jsonl as null)."""
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


@pytest.mark.slow
def test_fsdp_run_trains_logs_media_checkpoints_shards_and_exports(runs):
    out = runs["fsdp"]
    records, run = assert_every_metric(out, ranks=2)
    history = set().union(*run["history"])
    # Logged by the main rank after a forward on both ranks (a one-rank forward would hang).
    assert {"media/reconstructions/path", "media/captions/path"} <= history
    assert run["config"]["world_size"] == 2
    # The NaN step was skipped by the fused AdamW's found_inf on DTensor parameters: training goes on.
    assert any("nonfinite_step" in r and r["step"] == NAN_STEP for r in records)
    assert all(math.isfinite(r["total_loss"]) for r in records if "total_loss" in r and r["step"] != NAN_STEP)
    for checkpoint in sorted((out / "checkpoints").glob("step_*")):  # each rank wrote its own shard, no full copy
        assert {p.name for p in (checkpoint / "weights").iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp"}
        assert not (checkpoint / "model.safetensors").exists() and not (checkpoint / "optimizer.pt").exists()
    from transformers import AutoTokenizer

    from mmtrain.model import MultimodalModel

    model = MultimodalModel.from_pretrained(str(out / "model")).eval()  # the gathered full model
    tokenizer = AutoTokenizer.from_pretrained(str(out / "model"))
    ids = model.generate(torch.rand(2, 1, 32, 32), tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert ids.shape[0] == 2
    # Every exported tensor is the full one, and equals DDP's export up to reduction-order rounding.
    reference = MultimodalModel.from_pretrained(str(runs["ddp"] / "model")).state_dict()
    for name, tensor in model.state_dict().items():
        assert tensor.shape == reference[name].shape, name
        assert torch.allclose(tensor, reference[name], atol=1e-4), name


@pytest.mark.slow
def test_fsdp_gradient_statistics_equal_ddp(runs):
    """Under FSDP each rank holds a shard of every gradient: the logged statistics are reduced
    across the shards, so they equal DDP's (full gradients on every rank) at every step."""
    fsdp, ddp = _by_step(runs["fsdp"]), _by_step(runs["ddp"])
    assert fsdp.keys() == ddp.keys() and len(fsdp) >= 5
    for step, record in fsdp.items():
        for key in (*GRAD_KEYS, "total_loss", "val/total_loss"):
            if key in record:
                assert _close(record[key], ddp[step][key], 1e-5), (step, key, record[key], ddp[step][key])


@pytest.mark.slow
def test_fsdp_resume_from_its_sharded_checkpoint_is_the_same_run(runs):
    reference = {r["step"]: r for r in read_jsonl(runs["fsdp"] / "metrics.jsonl")}
    resumed = read_jsonl(runs["resumed"] / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [s for s in reference if s > 2]
    for record in resumed:
        keys = {k for k in record if not k.startswith(NOT_REPRODUCIBLE)}
        different = {k: (reference[record["step"]][k], record[k]) for k in keys
                     if k in reference[record["step"]] and record[k] != reference[record["step"]][k]}
        assert not different, f"step {record['step']}: {different}"


# ------------------------------------------------------------------------- in-process, no launch


def test_gradient_detail_merges_shards_and_keeps_rank_0_otherwise():
    from mmtrain.telemetry import gradient_detail

    g = torch.Generator().manual_seed(3)
    grads = {"a": [torch.randn(6, 4, generator=g)], "b": [torch.randn(5, generator=g), torch.randn(2, generator=g)]}
    shards = [{name: [t.chunk(2)[r] for t in ts if len(t.chunk(2)) > r] for name, ts in grads.items()} for r in (0, 1)]

    def row(part: dict, coef: float = 0.5) -> dict:
        total, per_module = grad_stats(part)
        return {"grad_detail": {k: v.item() for k, v in total.items()},
                "module_sq": {k: v.item() for k, v in per_module.items()}, "grad": {"clip_coef": coef}}

    whole = gradient_detail([row(grads)], sharded=False)
    merged = gradient_detail([row(shards[0]), row(shards[1])], sharded=True)
    assert merged.keys() == whole.keys()
    assert all(merged[k] == pytest.approx(whole[k], rel=1e-6) for k in whole)
    # DDP: every rank's row is the full gradient; adding them would double-count.
    assert gradient_detail([row(grads), row(grads)], sharded=False) == whole
    # What "rank 0's gradients speak for all" gave under FSDP: rank 0's shard only, wrong.
    rank_0_only = gradient_detail([row(shards[0]), row(shards[1])], sharded=False)
    assert rank_0_only["grad_norm/a"] < 0.9 * whole["grad_norm/a"]


def test_fsdp1_is_refused_with_the_field_and_the_fix(monkeypatch):
    from mmtrain.config import TrainConfig
    from mmtrain.distributed import build_accelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="fsdp_version is 1: mmtrain supports FSDP2 only; set fsdp_version: 2"):
        build_accelerator(TrainConfig(cpu=True))


def test_ddp_settings_come_from_the_config_and_only_without_fsdp(monkeypatch):
    from mmtrain.config import TrainConfig
    from mmtrain.distributed import build_accelerator

    acc = build_accelerator(TrainConfig(cpu=True, ddp_bucket_cap_mb=100, ddp_find_unused_parameters=True))
    assert acc.ddp_handler.to_kwargs() == {"bucket_cap_mb": 100, "find_unused_parameters": True}
    from conftest import reset_accelerate

    reset_accelerate()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert build_accelerator(TrainConfig(cpu=True)).ddp_handler is None


def _trained(seed: int, as_fsdp: bool = False, shard=None):
    """A small model after one AdamW step, its optimizer, its batch. ``as_fsdp``: with FSDP's
    parameter shapes; ``shard``: applied to the model before the optimizer is built (fully_shard)."""
    from mmtrain.config import ModelConfig
    from mmtrain.distributed import scalars_as_vectors
    from mmtrain.model import build_model

    torch.manual_seed(seed)
    model = build_model(ModelConfig(image_size=32, image_channels=1, latent_dim=8, base_channels=4, max_channels=8,
                                    embedding_dim=8, transformer_layers=2, text_layers=1, attention_heads=2,
                                    max_caption_length=6), 11)
    if as_fsdp:  # FSDP's shapes before the first step, as in a sharded run
        assert scalars_as_vectors(model) == ["alignment.logit_scale"]
    if shard is not None:
        shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    batch = {"pixel_values": torch.rand(2, 1, 32, 32), "input_ids": torch.randint(0, 11, (2, 6)),
             "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    model(batch)[0]["total_loss"].backward()
    opt.step()
    return model, opt


def test_sharded_checkpoint_loads_into_an_unsharded_model(tmp_path):
    """An FSDP checkpoint (DCP, scalar parameters stored as (1,)) resumes under DDP / one process."""
    import torch.distributed.checkpoint as dcp
    from accelerate import Accelerator
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from mmtrain.checkpoint_weights import SHARDED_DIR, load_weights

    source, source_opt = _trained(0, as_fsdp=True)
    model_state, optim_state = get_state_dict(source, source_opt)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp_path / SHARDED_DIR)
    target, target_opt = _trained(1, as_fsdp=False)
    load_weights(Accelerator(cpu=True), target, target_opt, tmp_path, torch.device("cpu"))
    assert target.alignment.logit_scale.shape == ()
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a.reshape(b.shape), b), name
    exp_avg = target_opt.state[target.alignment.logit_scale]["exp_avg"]
    assert torch.equal(exp_avg.reshape(1), source_opt.state[source.alignment.logit_scale]["exp_avg"])
    # DCP reads .metadata with a bare pickle.load: a crafted one is refused before it can run anything.
    _RunsCode.marker = tmp_path / "ran"
    (tmp_path / SHARDED_DIR / ".metadata").write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(CheckpointError, match=r"posix\.system is not allowed in a checkpoint"):
        load_weights(Accelerator(cpu=True), target, target_opt, tmp_path, torch.device("cpu"))
    assert not (tmp_path / "ran").exists()
    # Nor a class of DCP's own package outside its Metadata (one starts a process when unpickled).
    from torch.distributed.checkpoint._async_process_executor import _AsyncCheckpointProcess

    (tmp_path / SHARDED_DIR / ".metadata").write_bytes(pickle.dumps(_AsyncCheckpointProcess))
    with pytest.raises(CheckpointError, match=r"_AsyncCheckpointProcess is not allowed in a checkpoint"):
        load_weights(Accelerator(cpu=True), target, target_opt, tmp_path, torch.device("cpu"))


class _RunsCode:
    """Pickles as a call of os.system (what a crafted checkpoint file would hold)."""

    marker = Path("/nonexistent")

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(_RunsCode.marker))}",)


def test_ddp_checkpoint_loads_into_an_fsdp_model(tmp_path):
    """model.safetensors + optimizer.pt of a DDP run (full tensors, the optimizer keyed by index)
    into a fully_shard model (a one-rank gloo group in this process: DTensor parameters, the same
    code path as N ranks, where each keeps its own part of the full tensors)."""
    import torch.distributed as dist
    from safetensors.torch import save_model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from mmtrain.checkpoint_weights import MODEL_FILE, OPTIMIZER_FILE, _load_full_into_sharded

    source, source_opt = _trained(0)
    save_model(source, str(tmp_path / MODEL_FILE))
    torch.save(source_opt.state_dict(), tmp_path / OPTIMIZER_FILE)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        target, target_opt = _trained(1, as_fsdp=True, shard=fully_shard)
        assert isinstance(target.alignment.logit_scale, DTensor)
        _load_full_into_sharded(target, target_opt, tmp_path, torch.device("cpu"))
        full = get_model_state_dict(target, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        for name, tensor in source.state_dict().items():
            assert torch.equal(full[name].reshape(tensor.shape), tensor), name
        moments = target_opt.state[target.alignment.logit_scale]
        assert torch.equal(moments["exp_avg"].full_tensor().reshape(()),
                           source_opt.state[source.alignment.logit_scale]["exp_avg"])
        # A checkpoint of another model is refused with the file's name, not a traceback.
        save_model(torch.nn.Linear(2, 2), str(tmp_path / MODEL_FILE))
        with pytest.raises(CheckpointError, match=f"{MODEL_FILE} does not fit this model"):
            _load_full_into_sharded(target, target_opt, tmp_path, torch.device("cpu"))
    finally:
        dist.destroy_process_group()
