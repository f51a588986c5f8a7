"""Config: precedence, presets, validation messages, CLI exit codes and help."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY

from mmtrain.cli import main
from mmtrain.config import Config, ConfigError, build_config, field_default, iter_fields, load_config

PRESETS = sorted((REPO / "configs").glob("*.yaml"))


def test_defaults_then_yaml_then_overrides():
    assert load_config().optim.lr == 1e-3
    cfg = load_config(TINY)
    assert cfg.optim.lr == 3e-3 and cfg.model.image_size == 32
    cfg = load_config(TINY, {"optim.lr": "5e-4", "train.epochs": "7"})
    assert cfg.optim.lr == 5e-4 and cfg.train.epochs == 7 and cfg.model.image_size == 32


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, Config)


@pytest.mark.parametrize(("yaml_values", "overrides", "needle"), [
    ({"optimizer": {"lr": 1}}, {}, "unknown section 'optimizer'"),
    ({"optim": {"learning_rate": 1}}, {}, "unknown field 'optim.learning_rate'"),
    ({}, {"train.epochs": "abc"}, "train.epochs must be an integer"),
    ({}, {"optim.lr": "-1"}, "optim.lr must be > 0"),
    ({}, {"train.gradient_accumulation_steps": "0"}, "train.gradient_accumulation_steps must be > 0"),
    ({}, {"data.source": "imagefolder"}, "data.path is required"),
    ({}, {"data.source": "imagefolder", "data.path": "/no/such/folder"}, "data.path must be an existing folder"),
    ({}, {"model.image_size": "100"}, "model.image_size must be divisible by 2**image_encoder_layers = 32"),
    ({}, {"train.mixed_precision": "fp8"}, "train.mixed_precision must be one of no, fp16, bf16"),
    ({}, {"train.cpu": "maybe"}, "train.cpu must be true or false"),
])
def test_invalid_values_name_the_field(yaml_values, overrides, needle):
    with pytest.raises(ConfigError) as err:
        build_config(yaml_values, overrides)
    assert needle in str(err.value)


def test_yaml_syntax_error_gives_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 3\n  batch_size: [1, 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(bad) in str(err.value) and "line" in str(err.value)


def test_coercion_of_bool_list_null():
    cfg = build_config({}, {"train.cpu": "true", "wandb.tags": "a, b", "data.val_split": "null",
                            "optim.lr": 1})
    assert cfg.train.cpu is True and cfg.wandb.tags == ["a", "b"] and cfg.data.val_split is None
    assert isinstance(cfg.optim.lr, float)


def test_dump_round_trips(tmp_path):
    cfg = load_config(TINY, {"wandb.tags": "x,y", "train.epochs": 5})
    cfg.dump(tmp_path / "config.yaml")
    assert dataclasses.asdict(load_config(tmp_path / "config.yaml")) == dataclasses.asdict(cfg)


def test_cli_invalid_lr_exits_2_with_one_line(capsys):
    assert main(["train", "--config", str(TINY), "--optim.lr", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optim.lr" in err[0]


def test_cli_subprocess_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mmtrain", "train", "--config", "configs/tiny.yaml",
                           "--optim.lr", "-1", "--train.output_dir", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "optim.lr" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # rejected before any work


def test_help_lists_every_field_with_default(capsys):
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for key, f, _ in iter_fields():
        assert f"--{key}" in text, key
        assert f"(default: {field_default(f)!r})" in text, key


def test_missing_config_file_is_a_config_error():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Path("/no/such.yaml"))
