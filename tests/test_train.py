"""End-to-end training on the tiny preset, in process: the output contract and its numbers."""

import dataclasses
import warnings

import pytest
import torch
from conftest import read_jsonl, reset_accelerate, tiny_config
from wandb_files import offline_runs, read_run

from mmtrain.cli import main
from mmtrain.model import MultimodalModel, loss_names
from mmtrain.tokenizer import load_tokenizer
from mmtrain.trainer import Trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run shared by the assertions below (3 epochs, log every 2 optimizer steps)."""
    out = tmp_path_factory.mktemp("run")
    trainer = Trainer(tiny_config(out, **{"train.epochs": 3}))
    result = trainer.fit()
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    batch = next(iter(trainer.val_loader))
    trainer.accelerator.end_training()
    reset_accelerate()
    return out, result, model, batch


def test_output_contract(trained):
    out, result, _, _ = trained
    for name in ("config.yaml", "metrics.jsonl", "checkpoints", "model", "wandb"):
        assert (out / name).exists(), name
    assert (out / "model" / "model.safetensors").is_file()
    assert (out / "model" / "tokenizer.json").is_file()
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == ["step_00000006", "step_00000012", "step_00000018"]  # every epoch end
    assert (ckpts[0] / "train_state.json").is_file()
    assert result["optimizer_steps"] == 18  # 96 samples / 16 = 6 steps x 3 epochs


def test_loss_falls_and_every_record_has_a_step(trained):
    out, _, _, _ = trained
    records = read_jsonl(out / "metrics.jsonl")
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)) == list(range(2, 19, 2))
    train = [r for r in records if "total_loss" in r]
    assert train[-1]["total_loss"] < 0.85 * train[0]["total_loss"]
    for r in train:
        for key in (*loss_names(), "learning_rate", "epoch", "batch_size", "grad_norm", "cpu_percent"):
            assert key in r, key
        weighted = r["loss_image"] + r["loss_caption"] + 0.5 * r["loss_alignment"]
        assert r["total_loss"] == pytest.approx(weighted, rel=1e-5)
    evals = [r for r in records if "val/total_loss" in r]
    assert [r["step"] for r in evals] == [6, 12, 18]
    assert train[-1]["learning_rate"] == pytest.approx(1e-4)  # tiny.yaml min_lr, at the last step


def test_one_offline_wandb_run_matches_metrics_jsonl(trained):
    out, _, _, _ = trained
    runs = offline_runs(out)
    assert len(runs) == 1
    run = read_run(runs[0])
    assert run["config"]["world_size"] == 1
    assert run["config"]["optim"]["lr"] == pytest.approx(3e-3)
    assert run["config"]["train_samples"] == 96 and run["config"]["val_samples"] == 32
    records = {r["step"]: r for r in read_jsonl(out / "metrics.jsonl")}
    history = {h["_step"]: h for h in run["history"]}
    assert set(history) == set(records)
    for step, record in records.items():
        assert history[step]["total_loss"] == pytest.approx(record.get("total_loss"), rel=1e-9)
    assert run["summary"]["total_parameters"] == run["config"]["total_parameters"] > 0


def test_exported_model_reloads_with_identical_outputs(trained):
    out, _, model, batch = trained
    loaded = MultimodalModel.from_pretrained(out / "model").eval()
    assert loaded.config == model.config
    with torch.no_grad():
        a_losses, a_out = model(batch)
        b_losses, b_out = loaded(batch)
    for key in loss_names():
        assert torch.equal(a_losses[key], b_losses[key]), key
    assert torch.equal(a_out["logits"], b_out["logits"])
    tok = load_tokenizer(out / "model")
    assert tok.pad_token_id == 0 and len(tok) == model.config.vocab_size


def test_existing_run_is_refused_then_overwritten(trained, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--config", "configs/tiny.yaml", "--train.output_dir", str(out), "--train.max_steps", "2",
            "--wandb.mode", "disabled"]
    assert main(args) == 0
    before = (out / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "train.output_dir" in err and "--train.overwrite" in err and "Traceback" not in err
    assert (out / "metrics.jsonl").read_bytes() == before  # nothing touched
    assert main([*args, "--train.overwrite", "true"]) == 0
    assert len(read_jsonl(out / "metrics.jsonl")) == 1


def test_bf16_autocast_on_cpu(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "bf16", **{"train.mixed_precision": "bf16", "train.max_steps": 2,
                                                         "wandb.mode": "disabled"}))
    assert trainer.accelerator.mixed_precision == "bf16"
    batch = next(iter(trainer.train_loader))
    seen = []
    inner = trainer.accelerator.unwrap_model(trainer.model)
    hook = inner.image_encoder.to_latent.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    losses, outputs = trainer.model(batch)
    hook.remove()
    assert seen == [torch.bfloat16]  # matmuls ran under bf16 autocast
    assert outputs["logits"].dtype == torch.float32  # Accelerate hands outputs back in fp32
    assert losses["total_loss"].dtype == torch.float32 and torch.isfinite(losses["total_loss"])
    result = trainer.fit()
    assert result["optimizer_steps"] == 2 and result["final_train_loss"] > 0


def test_fp16_on_cpu_warns_and_runs_bf16(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(tiny_config(tmp_path / "fp16", **{"train.mixed_precision": "fp16", "train.max_steps": 1,
                                                             "wandb.mode": "disabled"}))
    assert trainer.accelerator.mixed_precision == "bf16"
    assert any("fp16" in str(w.message) and "bf16" in str(w.message) for w in caught)
    assert trainer.cfg.train.mixed_precision == "bf16"  # config.yaml records what the run trains in


def test_auto_precision_is_the_launchers(monkeypatch):
    """train.mixed_precision auto takes what `accelerate launch` exports (its flag or the config
    file's mixed_precision), no without a launcher; a named precision wins over the launcher's."""
    from mmtrain.distributed import resolve_precision
    from mmtrain.errors import ConfigError

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert resolve_precision("auto", use_cpu=True) == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert resolve_precision("auto", use_cpu=True) == "bf16"
    assert resolve_precision("no", use_cpu=True) == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(ConfigError, match=r"--train\.mixed_precision"):
        resolve_precision("auto", use_cpu=True)


def test_config_yaml_reproduces_the_run_config(trained):
    from mmtrain.config import load_config

    out, _, _, _ = trained
    again = load_config(out / "config.yaml")
    # The precision asked for (auto: the launcher's, none here) is recorded as the one trained in.
    assert dataclasses.asdict(again) == dataclasses.asdict(tiny_config(out, **{"train.epochs": 3,
                                                                               "train.mixed_precision": "no"}))
