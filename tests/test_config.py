"""Config: precedence, presets, validation messages, coercion, dump round trip, CLI exit codes and help."""

import functools
import subprocess
import sys
import types
import typing

import pytest
import yaml
from conftest import REPO

from mmtrain import cli
from mmtrain.cli import main
from mmtrain.config import (
    SECTIONS,
    Config,
    ConfigError,
    ModelConfig,
    build_config,
    field_default,
    iter_fields,
    load_config,
    read_yaml,
)

# Training presets; configs/sweep*.yaml are W&B sweep specs (tests/test_sweep.py loads them).
PRESETS = sorted(p for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith("sweep"))


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
    ("train.epochs", "abc", "train.epochs must be an integer such as 16, 1_000 or 1e3 (got 'abc')"),
    ("train.epochs", "2.5", "train.epochs must be an integer such as 16, 1_000 or 1e3 (got '2.5')"),
    ("optim.lr", "fast", "optim.lr must be a finite number such as 0.001 or 5e-4 (got 'fast')"),
    ("train.cpu", "maybe", "train.cpu must be true or false (or yes/no, on/off) (got 'maybe')"),
    ("data.val_split", ["a"], "data.val_split must be a string or null (got ['a'])"),
    ("train.mixed_precision", "fp8", "train.mixed_precision must be one of auto, no, fp16, bf16 (got 'fp8')"),
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
    with pytest.raises(ConfigError, match=r"optim\.lr must be a finite number"):
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


# --- one rule per type, the same from a config file and from the command line ---------------------------


class Refused(str):
    """An expected refusal; the message says the field 'must be' this (and shows the value)."""

    def __repr__(self) -> str:
        return f"refused ('must be {self}')"


INT_CASES = [("16", 16), ("-3", -3), ("0", 0), ("1_000", 1000), ("1e3", 1000), ("1000.0", 1000), ("2.5e1", 25),
             ("12345678901234567891", 12345678901234567891)] + [
    (text, Refused("an integer")) for text in ("1.5", "abc", "0x10", "yes", "true", "nan", "inf", "1e-3", "")]
FLOAT_CASES = [("5e-4", 5e-4), ("1.0e-3", 1e-3), ("1", 1.0), ("1.10", 1.1), ("-2", -2.0), ("1_000.5", 1000.5)] + [
    (text, Refused("a finite number")) for text in ("inf", "-inf", "nan", ".inf", "1e999", "fast", "true", "")]
BOOL_CASES = [("true", True), ("True", True), ("yes", True), ("ON", True), ("false", False), ("No", False),
              ("off", False)] + [(text, Refused("true or false")) for text in ("1", "0", "maybe", "")]
STR_CASES = [(text, text) for text in ("hello", "1.10", "2024", "1e3", "no", "null", "~", "a,b", "")]
OPTIONAL_STR_CASES = [(text, None) for text in ("null", "None", "NULL", "~", "")] + [
    (text, text) for text in ("val", "1.10", "no", "2024")]
LIST_CASES = [("2024", ["2024"]), ("1.10,2.0", ["1.10", "2.0"]), ("a, b", ["a", "b"]), ("a,b,", ["a", "b"]),
              ("[a, b]", ["a", "b"]), ("[1.10, no, null]", ["1.10", "no", "null"]), ("[a, 'b,c']", ["a", "b,c"]),
              ("", []), ("[]", [])] + [(text, Refused("a list")) for text in ("{a: 1}", "[a, [b]]")]


def _cases(tp):
    """The cases of the rule for type ``tp``; a type without one gets a case that fails, naming it."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return [(str(c), c) for c in typing.get_args(tp)] + [("nope", Refused("one of"))]
    if origin in (typing.Union, types.UnionType) and set(typing.get_args(tp)) == {str, type(None)}:
        return OPTIONAL_STR_CASES
    if origin is list and typing.get_args(tp) == (str,):
        return LIST_CASES
    known = {int: INT_CASES, float: FLOAT_CASES, bool: BOOL_CASES, str: STR_CASES}
    return known.get(tp, [(None, f"no rule for type {tp!r}: add its cases to test_config.py")])


class _Loaded(Exception):
    def __init__(self, cfg):
        self.cfg = cfg


@pytest.fixture
def train_cli(monkeypatch, capsys):
    """``mmtrain train ARGV`` up to its config: the Config it would train with, or its one-line error.

    The real main -> argparse -> run_train -> load_config path; only what follows load_config is cut off.
    """
    def load_and_stop(*args, **kwargs):
        raise _Loaded(load_config(*args, **kwargs))

    monkeypatch.setattr(cli, "load_config", load_and_stop)
    monkeypatch.setattr(cli, "build_parser", functools.cache(cli.build_parser))  # hundreds of runs: build it once

    def run(*argv):
        capsys.readouterr()
        try:
            code = main(["train", *argv])
        except _Loaded as loaded:
            return loaded.cfg
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith("mmtrain: error: "), err
        return ConfigError(err[0].removeprefix("mmtrain: error: "))

    return run


@pytest.fixture
def no_validation(monkeypatch):
    """Only coercion: the sections' range checks (e.g. epochs > 0) would refuse many of the table's values."""
    for cls in SECTIONS.values():
        monkeypatch.setattr(cls, "__post_init__", lambda self: None)


def _outcome(result, key):
    if isinstance(result, ConfigError):
        return result
    section, name = key.split(".")
    return getattr(getattr(result, section), name)


@pytest.mark.usefixtures("no_validation")
@pytest.mark.parametrize(("key", "tp"), [(key, tp) for key, _, tp in iter_fields()], ids=lambda v: str(v))
def test_every_field_reads_a_value_the_same_from_yaml_and_command_line(key, tp, train_cli, tmp_path):
    section, name = key.split(".")
    problems = []
    for i, (text, expected) in enumerate(_cases(tp)):
        assert text is not None, expected
        path = _write(tmp_path, f"{section}:\n  {name}: {text}\n", f"case{i}.yaml")
        from_yaml = _outcome(train_cli("--config", str(path)), key)
        from_cli = _outcome(train_cli(f"--{key}={text}"), key)  # = keeps "-inf" a value, not an option
        case = f"{key} {text!r}: YAML -> {from_yaml!r}, command line -> {from_cli!r}, expected {expected!r}"
        if isinstance(expected, Refused):
            wanted = f"{key} must be {expected}"
            ok = all(isinstance(r, ConfigError) and str(r).startswith(wanted) for r in (from_yaml, from_cli))
            # The same message, value included, except that YAML shows a flow collection ([..], {..}) parsed.
            same = ok and (str(from_yaml).split(" (got ")[0] == str(from_cli).split(" (got ")[0]
                           if text.startswith(("[", "{")) else str(from_yaml) == str(from_cli))
            if not (same and str(from_cli).endswith(f"(got {text!r})")):
                problems.append(case)
        elif not all(r == expected and type(r) is type(expected) for r in (from_yaml, from_cli)):
            problems.append(case)
    assert not problems, "\n".join(problems)


def test_issue_examples(train_cli, tmp_path):
    assert train_cli("--wandb.tags", "2024").wandb.tags == ["2024"]
    assert train_cli("--wandb.tags", "1.10,2.0").wandb.tags == ["1.10", "2.0"]
    assert train_cli("--config", str(_write(tmp_path, "wandb:\n  tags: 1.10\n"))).wandb.tags == ["1.10"]

    for text in ("inf", "nan"):
        err = train_cli("--optim.lr", text)
        assert str(err) == f"optim.lr must be a finite number such as 0.001 or 5e-4 (got '{text}')"
    assert "finite" in str(train_cli("--optim.lr=-inf"))
    assert "finite" in str(train_cli("--config", str(_write(tmp_path, "optim:\n  lr: .inf\n"))))

    assert train_cli("--config", str(_write(tmp_path, "train:\n  max_steps: 1e3\n"))).train.max_steps == 1000
    assert train_cli("--train.max_steps", "1000.0").train.max_steps == 1000
    assert train_cli("--train.max_steps", "1e3").train.max_steps == 1000


def test_yaml_collection_for_a_scalar_field_is_refused(tmp_path):
    # The command line has no collections for these: there "[a, b]" is simply the text.
    with pytest.raises(ConfigError, match=r"wandb\.name must be a string or null \(got \['a', 'b'\]\)"):
        load_config(_write(tmp_path, "wandb:\n  name: [a, b]\n"))
    with pytest.raises(ConfigError, match=r"train\.epochs must be an integer"):
        load_config(_write(tmp_path, "train:\n  epochs: {a: 1}\n"))
    assert build_config({}, {"wandb.name": "[a, b]"}).wandb.name == "[a, b]"


def test_explicit_yaml_tags_and_merge_keys_still_work(tmp_path):
    cfg = load_config(_write(tmp_path, "train:\n  epochs: !!int 4\n  cpu: !!bool yes\n"
                                       "model:\n  <<: {latent_dim: 64}\n  dropout: 0.0\n"))
    assert (cfg.train.epochs, cfg.train.cpu, cfg.model.latent_dim) == (4, True, 64)
    with pytest.raises(ConfigError, match=r"optim\.lr must be a finite number"):
        load_config(_write(tmp_path, "optim:\n  lr: !!float nan\n"))


def test_saved_config_reads_back_as_to_dict(tmp_path):
    """The trainer compares a run's saved config.yaml, read with read_yaml, with Config.to_dict()."""
    cfg = build_config({}, {"wandb.tags": "[1.10, no, 2024, '']", "wandb.project": "1e3", "wandb.name": "yes",
                            "data.image_column": "null", "train.mixed_precision": "no", "optim.lr": "5e-4"})
    assert cfg.wandb.tags == ["1.10", "no", "2024", ""] and cfg.data.image_column == "null"
    cfg.dump(tmp_path / "config.yaml")
    assert read_yaml(tmp_path / "config.yaml") == cfg.to_dict()
    assert load_config(tmp_path / "config.yaml") == cfg


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
    assert list(raw) == ["model", "data", "optim", "train", "checkpoint", "log", "wandb", "diagnostics"]
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
