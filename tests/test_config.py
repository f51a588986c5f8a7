"""Config: precedence, presets, validation messages, coercion, dump round trip, CLI exit codes and help."""

import subprocess
import sys

import pytest
import yaml
from conftest import REPO

from mmtrain.cli import main
from mmtrain.config import (
    Config,
    ConfigError,
    ModelConfig,
    build_config,
    field_default,
    iter_fields,
    load_config,
)

PRESETS = sorted((REPO / "configs").glob("*.yaml"))


def _write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(yaml_values=None, overrides=None):
    with pytest.raises(ConfigError) as err:
        build_config(yaml_values or {}, overrides or {})
    return str(err.value)


# --- precedence and presets -------------------------------------------------------------------------------


def test_defaults_then_yaml_then_overrides(tiny_yaml):
    defaults = load_config()
    assert defaults == Config()
    assert (defaults.optim.lr, defaults.model.image_size, defaults.train.epochs) == (1e-3, 128, 10)

    from_yaml = load_config(tiny_yaml)
    assert (from_yaml.optim.lr, from_yaml.model.image_size, from_yaml.train.epochs) == (3e-3, 32, 2)
    assert from_yaml.optim.beta1 == defaults.optim.beta1  # not in the YAML: the default stays

    both = load_config(tiny_yaml, {"optim.lr": "5e-4", "train.epochs": "7"})
    assert (both.optim.lr, both.train.epochs) == (5e-4, 7)  # overrides win over the YAML
    assert both.model.image_size == 32 and both.optim.min_lr == 1e-4  # YAML still wins over defaults


def test_override_without_yaml_beats_default():
    assert load_config(None, {"train.batch_size": 3}).train.batch_size == 3


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads_with_its_values(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, Config)
    raw = yaml.safe_load(preset.read_text())
    assert raw, f"{preset.name} is empty"
    for section, values in raw.items():
        for name, value in values.items():
            assert getattr(getattr(cfg, section), name) == value, f"{preset.name}: {section}.{name}"


def test_there_are_presets():
    assert {p.name for p in PRESETS} >= {"default.yaml", "laptop.yaml", "tiny.yaml"}


# --- errors name what the user typed ----------------------------------------------------------------------


def test_unknown_section_names_it(tmp_path):
    path = _write(tmp_path, "optimizer:\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "'optimizer'" in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize(("yaml_values", "overrides"), [
    ({"optim": {"learning_rate": 1}}, {}),
    ({}, {"optim.learning_rate": "1"}),
])
def test_unknown_field_names_it(yaml_values, overrides):
    assert "'optim.learning_rate'" in _error(yaml_values, overrides)


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("train.epochs", "abc", "train.epochs must be an integer (got 'abc')"),
    ("train.epochs", "2.5", "train.epochs must be an integer (got 2.5)"),
    ("optim.lr", "fast", "optim.lr must be a number (got 'fast')"),
    ("train.cpu", "maybe", "train.cpu must be true or false (got 'maybe')"),
    ("train.mixed_precision", "fp8", "train.mixed_precision must be one of no, fp16, bf16 (got 'fp8')"),
    ("wandb.mode", "sometimes", "wandb.mode must be one of auto, online, offline, disabled (got 'sometimes')"),
    ("wandb.tags", "{a: 1}", "wandb.tags must be a list"),
])
def test_wrong_type_names_the_field(key, value, needle):
    assert needle in _error(overrides={key: value})


def test_negative_lr():
    msg = _error(overrides={"optim.lr": "-1"})
    assert "optim.lr" in msg and "> 0" in msg and "-1" in msg


def test_zero_lr_and_min_lr_above_lr():
    assert "optim.lr" in _error(overrides={"optim.lr": 0})
    assert "optim.min_lr" in _error(overrides={"optim.lr": 1e-3, "optim.min_lr": 1e-2})


def test_zero_gradient_accumulation_steps():
    assert "train.gradient_accumulation_steps must be > 0" in _error(
        overrides={"train.gradient_accumulation_steps": "0"})


def test_imagefolder_needs_a_path():
    msg = _error(overrides={"data.source": "imagefolder"})
    assert "data.path" in msg and "required" in msg and "imagefolder" in msg


def test_imagefolder_path_must_exist(tmp_path):
    missing = tmp_path / "no-such-folder"
    msg = _error(overrides={"data.source": "imagefolder", "data.path": str(missing)})
    assert "data.path" in msg and "existing folder" in msg and str(missing) in msg


def test_imagefolder_existing_path_is_accepted(tmp_path):
    cfg = build_config({}, {"data.source": "imagefolder", "data.path": str(tmp_path)})
    assert cfg.data.path == str(tmp_path)


def test_image_size_must_divide_by_the_encoder_stride():
    msg = _error(overrides={"model.image_size": "100"})  # 5 encoder layers by default: 32
    assert "model.image_size" in msg and "2**image_encoder_layers = 32" in msg and "(got 100)" in msg
    assert "use e.g. 96" in msg  # the nearest valid size is suggested
    assert build_config({}, {"model.image_size": 100, "model.image_encoder_layers": 2}).model.image_size == 100
    with pytest.raises(ConfigError, match=r"model\.image_size"):
        ModelConfig(image_size=48, image_encoder_layers=5)


def test_yaml_syntax_error_reports_file_and_line(tmp_path):
    path = _write(tmp_path, "train:\n  epochs: 3\n  batch_size: a: b\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "line 3" in msg and "not valid YAML" in msg
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no chained YAML traceback


def test_yaml_top_level_and_section_must_be_mappings(tmp_path):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        load_config(_write(tmp_path, "train: 3\n"))


def test_empty_yaml_and_empty_section_mean_defaults(tmp_path):
    assert load_config(_write(tmp_path, "")) == Config()
    assert load_config(_write(tmp_path, "model:\n")) == Config()


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(REPO / "configs" / "no-such.yaml")


# --- coercion ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("true", True), ("false", False), ("True", True), ("yes", True), ("no", False), (True, True),
])
def test_bool_coercion(text, expected):
    assert build_config({}, {"train.cpu": text}).train.cpu is expected


@pytest.mark.parametrize(("value", "expected"), [
    ("a, b", ["a", "b"]), ("a,b,", ["a", "b"]), ("solo", ["solo"]), ("[x, y]", ["x", "y"]),
    (["p", "q"], ["p", "q"]), ("1,2", ["1", "2"]),
])
def test_list_coercion(value, expected):
    assert build_config({}, {"wandb.tags": value}).wandb.tags == expected


@pytest.mark.parametrize("value", ["null", "None", "~", None])
def test_null_coercion(value):
    cfg = build_config({}, {"data.val_split": value, "wandb.entity": value})
    assert cfg.data.val_split is None and cfg.wandb.entity is None


def test_numbers_and_strings_coercion():
    cfg = build_config({}, {"optim.lr": 1, "optim.min_lr": "1e-5", "train.epochs": 3.0, "wandb.project": 42,
                            "data.val_split": "val"})
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1.0
    assert cfg.optim.min_lr == 1e-5
    assert isinstance(cfg.train.epochs, int) and cfg.train.epochs == 3
    assert cfg.wandb.project == "42" and cfg.data.val_split == "val"
    with pytest.raises(ConfigError, match=r"optim\.lr must be a number"):
        build_config({}, {"optim.lr": True})  # a bool is not a number


def test_yaml_file_values_are_coerced(tmp_path):
    path = _write(tmp_path, "train:\n  cpu: yes\n  epochs: 4.0\nwandb:\n  tags: [a, b]\n  entity: null\n"
                            "optim:\n  lr: 5e-4\n")
    cfg = load_config(path)
    assert cfg.train.cpu is True and cfg.train.epochs == 4 and cfg.wandb.tags == ["a", "b"]
    assert cfg.wandb.entity is None and cfg.optim.lr == 5e-4


def test_mixed_precision_no_in_a_yaml_file(tmp_path):
    assert load_config(_write(tmp_path, "train:\n  mixed_precision: no\n")).train.mixed_precision == "no"


def test_mixed_precision_no_on_the_command_line():
    assert build_config({}, {"train.mixed_precision": "no"}).train.mixed_precision == "no"


# --- dump ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_dump_then_load_round_trips(preset, tmp_path):
    cfg = load_config(preset, {"wandb.tags": "x,y", "train.epochs": 5, "train.cpu": "true", "wandb.name": "run-1",
                               "data.val_split": "validation", "optim.min_lr": "1e-5", "train.mixed_precision": "no"})
    cfg.dump(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert again.wandb.tags == ["x", "y"] and again.train.mixed_precision == "no" and again.optim.min_lr == 1e-5


def test_dump_is_readable_yaml_with_every_section(tmp_path):
    load_config().dump(tmp_path / "c.yaml")
    raw = yaml.safe_load((tmp_path / "c.yaml").read_text())
    assert list(raw) == ["model", "data", "optim", "train", "checkpoint", "wandb"]
    assert sum(len(v) for v in raw.values()) == len(list(iter_fields()))


# --- command line -------------------------------------------------------------------------------------------


def test_cli_invalid_lr_exits_2_with_one_line(capsys, tiny_yaml):
    assert main(["train", "--config", str(tiny_yaml), "--optim.lr", "-1"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "optim.lr" in lines[0] and lines[0].startswith("mmtrain: error:")
    assert "Traceback" not in captured.err


def test_cli_yaml_error_exits_2(capsys, tmp_path):
    path = _write(tmp_path, "train:\n  epochs: [1\n")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "line" in err[0]


def test_cli_unknown_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as done:
        main(["train", "--optim.learning_rate", "1"])
    assert done.value.code == 2
    assert "--optim.learning_rate" in capsys.readouterr().err


def test_cli_subprocess_exit_code_and_no_traceback(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "mmtrain", "train", "--config", "configs/tiny.yaml",
                           "--optim.lr", "-1", "--train.output_dir", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "optim.lr" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists()  # rejected before any work


def test_help_lists_every_field_with_its_default(capsys):
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines; compare with single spaces
    fields = list(iter_fields())
    assert len(fields) > 40
    for key, f, _ in fields:
        assert f"--{key}" in text, key
        assert f"(default: {field_default(f)!r})" in text, key
        assert " ".join(f.metadata["help"].split())[:30] in text, key
    assert "--config" in text
