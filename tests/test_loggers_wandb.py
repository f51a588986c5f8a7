"""The W&B sink: its mode rules, and W&B outages that never stop a run, with real offline runs.

Ported from the Tracker tests (test_wandb_mode.py, test_wandb_outage.py) to ``WandbLogger`` behind
``Loggers``: instead of a tiny training run, ``run_steps`` logs what a run logs (six optimizer
steps, a validation record at the last one, a flush per checkpoint, a summary) through the real
jsonl and W&B sinks. ``monkeypatch`` replaces only what cannot happen here: a server that refuses
or never answers, and a run whose calls raise. conftest isolates W&B (no key, NETRC pointing at no
file), so every run is offline or disabled and nothing is sent.
"""

import os
import pty
import select
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import wandb
from conftest import REPO, read_jsonl
from PIL import Image as PILImage
from wandb.proto import wandb_internal_pb2 as pb
from wandb_files import _payloads, offline_runs, read_run, record_modes

from mmtrain.config import WandbConfig
from mmtrain.loggers import Image, Loggers, Table, build_loggers
from mmtrain.loggers.wandb_logger import WandbLogger, resolve_mode

FAKE_KEY = "x" * 40
NO_CREDENTIALS = "no W&B credentials"
IGNORED = "is not online, offline or disabled"
STEPS = list(range(1, 7))
EPOCH_METRICS = ["val/*", "epoch_train_loss_avg"]
real_init = wandb.init


def run_steps(out: Path, **wandb_fields) -> tuple[Loggers, list[str]]:
    """Log a six-step run through jsonl + W&B; returns (the loggers, the W&B warnings given)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loggers = build_loggers(True, out, ["wandb"], WandbConfig(**wandb_fields), EPOCH_METRICS)
        loggers.open({"train": {"epochs": 1}})
        for step in STEPS:
            loggers.log({"total_loss": 1.0 / step}, step)
            if step == STEPS[-1]:  # the epoch's end: validation at the same step, in its own call
                loggers.log({"val/total_loss": 0.5, "epoch": 1, "epoch_train_loss_avg": 0.3}, step)
            if step % 3 == 0:  # a checkpoint: the flush before it is committed
                loggers.flush()
        loggers.summary({"status": "finished", "best_validation_loss": 0.5})
        loggers.close()
    return loggers, [str(w.message) for w in caught if "W&B" in str(w.message)]


def assert_metrics_complete(out: Path) -> None:
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == STEPS
    assert all("total_loss" in r for r in records)
    assert "val/total_loss" in records[-1]
    assert (out / "summary.json").is_file()


def written_runs(out: Path) -> list[Path]:
    """The offline run files, once wandb-core has written them out (teardown waits for it)."""
    wandb.teardown()
    return offline_runs(out)


def set_env(monkeypatch, wandb_mode, credentials):
    if wandb_mode is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", wandb_mode)
    if credentials:
        monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    else:  # conftest already removed it and points NETRC at a missing file
        monkeypatch.delenv("WANDB_API_KEY", raising=False)


# ---- modes ----------------------------------------------------------------------------------------

# (WANDB_MODE, wandb.mode, credentials) -> (mode passed to wandb.init, expected warning or None)
TABLE = {
    # auto: WANDB_MODE wins when it names a W&B mode ("run"/"dryrun" are wandb's old names)
    (None, "auto", True): ("online", None),
    (None, "auto", False): ("offline", None),
    ("offline", "auto", True): ("offline", None),
    ("dryrun", "auto", True): ("offline", None),
    ("disabled", "auto", True): ("disabled", None),
    ("online", "auto", True): ("online", None),
    ("run", "auto", True): ("online", None),
    ("online", "auto", False): ("offline", NO_CREDENTIALS),  # never the login prompt
    ("run", "auto", False): ("offline", NO_CREDENTIALS),
    ("", "auto", False): ("offline", None),  # set but empty = not set
    ("bogus", "auto", True): ("online", IGNORED),
    ("shared", "auto", False): ("offline", IGNORED),
    # an explicit wandb.mode wins over any WANDB_MODE
    ("disabled", "offline", True): ("offline", None),
    ("online", "offline", True): ("offline", None),
    ("offline", "online", True): ("online", None),
    ("disabled", "online", True): ("online", None),
    ("offline", "online", False): ("offline", NO_CREDENTIALS),
    ("online", "disabled", True): ("disabled", None),
    ("offline", "disabled", False): ("disabled", None),
    (None, "offline", True): ("offline", None),
    (None, "online", False): ("offline", NO_CREDENTIALS),
}


@pytest.mark.parametrize(("env", "config", "credentials"), list(TABLE), ids=[
    f"WANDB_MODE={e}-wandb.mode={c}-{'key' if k else 'nokey'}" for e, c, k in TABLE])
def test_mode_table(monkeypatch, env, config, credentials):
    set_env(monkeypatch, env, credentials)
    expected_mode, expected_warning = TABLE[env, config, credentials]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_mode(config) == expected_mode
    messages = [str(w.message) for w in caught]
    if expected_warning is None:
        assert messages == []
    else:
        assert len(messages) == 1 and expected_warning in messages[0], messages
        if expected_warning == NO_CREDENTIALS:  # says which setting asked for online
            assert (f"WANDB_MODE={env}" if config == "auto" else "wandb.mode=online") in messages[0]


def recorded_offline_flag(wandb_file) -> bool:
    """The ``offline`` feature flag in the run record of a real ``.wandb`` file."""
    for payload in _payloads(wandb_file.read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "run":
            return record.run.telemetry.feature.offline
    raise AssertionError(f"no run record in {wandb_file}")


@pytest.mark.parametrize(("env", "config", "asked"), [
    ("offline", "auto", "offline"),    # WANDB_MODE wins under auto
    ("online", "auto", "offline"),     # online without credentials: offline, never a prompt
    ("disabled", "offline", "offline"),  # the explicit value wins, in wandb too
])
def test_real_run_mode(tmp_path, monkeypatch, env, config, asked):
    set_env(monkeypatch, env, credentials=False)
    wandb.teardown()  # wandb reads WANDB_MODE once per process, when its singleton is set up
    modes = record_modes(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = WandbLogger(tmp_path, WandbConfig(mode=config))
        logger.open({"x": 1}, None)
        assert wandb.setup().settings.mode == env  # wandb itself saw the env var...
        assert logger._run.settings.mode == asked  # ...and still ran in the mode mmtrain passed
        logger.log({"loss": 1.0}, step=1)
        logger.close()
    runs = written_runs(tmp_path)
    assert modes == [asked] and logger.mode == asked
    assert len(runs) == 1 and runs[0].parent == logger.run_dir
    assert recorded_offline_flag(runs[0])
    warned = [str(w.message) for w in caught if "credentials" in str(w.message)]
    assert len(warned) == (1 if env == "online" else 0), warned


def test_explicit_disabled_starts_nothing(tmp_path, monkeypatch):
    set_env(monkeypatch, "offline", credentials=False)
    monkeypatch.setattr(wandb, "init", lambda *a, **k: pytest.fail("wandb.init called with wandb.mode=disabled"))
    loggers = build_loggers(True, tmp_path, ["wandb"], WandbConfig(mode="disabled"), EPOCH_METRICS)
    loggers.open({"x": 1})
    loggers.log({"loss": 1.0}, step=1)
    loggers.close()
    logger = loggers.get("wandb")
    assert logger.mode == "disabled" and logger.run_id is None and logger.run_dir is None
    assert not (tmp_path / "wandb").exists()
    assert (tmp_path / "metrics.jsonl").read_text().strip() == '{"step": 1, "loss": 1.0}'
    assert loggers.report_lines() == ["W&B:        disabled"] and loggers.state_dict() == {}


def test_a_wandb_mode_wandb_rejects_disables_wandb_even_with_an_explicit_mode(tmp_path, monkeypatch):
    """wandb validates WANDB_MODE itself in every wandb.init, whatever mode= it is given."""
    set_env(monkeypatch, "bogus", credentials=False)
    wandb.teardown()  # a fresh wandb singleton reads WANDB_MODE
    loggers, warned = run_steps(tmp_path, mode="offline")
    wandb.teardown()
    assert loggers.get("wandb").mode == "disabled" and offline_runs(tmp_path) == []
    assert len(warned) == 1 and "disabled" in warned[0] and "bogus" in warned[0], warned
    assert_metrics_complete(tmp_path)


CHILD = """
import sys
from pathlib import Path
from mmtrain.config import WandbConfig
from mmtrain.loggers.wandb_logger import WandbLogger
logger = WandbLogger(Path(sys.argv[1]), WandbConfig(mode="auto", init_timeout=5))
logger.open({}, None)
print("MODE", logger.mode, flush=True)
logger.close()
"""


def test_wandb_mode_online_without_credentials_does_not_prompt_on_a_terminal(tmp_path):
    """On a terminal, ``wandb.init(mode="online")`` without credentials asks "Enter your choice" and
    waits (wandb 0.31.0). With WANDB_MODE=online and wandb.mode=auto mmtrain must not get there."""
    env = {**os.environ, "WANDB_MODE": "online", "PYTHONPATH": str(REPO)}
    env.pop("WANDB_API_KEY", None)
    master, slave = pty.openpty()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdin=slave, stdout=slave,
                             stderr=slave, env=env, cwd=tmp_path, close_fds=True)
    os.close(slave)
    output, deadline = b"", time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
            elif child.poll() is not None:
                break
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(30)
        os.close(master)
    text = output.decode(errors="replace")
    assert "Enter your choice" not in text, text
    assert "MODE offline" in text, text
    assert child.returncode == 0, text
    assert len(offline_runs(tmp_path)) == 1


# ---- what an offline run records, resume and the report ------------------------------------------


def test_offline_run_records_every_step_media_and_epoch_axis(tmp_path, monkeypatch):
    defined = []

    def init(*args, **kwargs):
        run = real_init(*args, **kwargs)
        real_define = run.define_metric

        def define_metric(name, **kw):
            defined.append((name, kw.get("step_metric")))
            return real_define(name, **kw)

        run.define_metric = define_metric
        return run

    monkeypatch.setattr(wandb, "init", init)
    loggers = build_loggers(True, tmp_path, ["wandb"], WandbConfig(mode="offline"), EPOCH_METRICS)
    loggers.open({"train": {"epochs": 1}})
    grid = Image(np.full((4, 6, 3), 200, np.uint8), caption="grid")
    loggers.log({"total_loss": 1.0, "media/reconstructions": grid}, 1)
    before = set(Path(tempfile.gettempdir()).glob("mmtrain-wandb-media-*"))
    loggers.log({"media/captions": Table(["image", "text"], [[Image(np.zeros((4, 4), np.uint8)), "a"]])}, 1)
    assert set(Path(tempfile.gettempdir()).glob("mmtrain-wandb-media-*")) <= before  # the PNGs' folder is gone
    loggers.log({"total_loss": 0.5}, 2)
    loggers.summary({"status": "finished"})
    loggers.close()
    assert defined == [("epoch", None), ("val/*", "epoch"), ("epoch_train_loss_avg", "epoch")]
    (run_file,) = written_runs(tmp_path)
    run = read_run(run_file)
    assert run["config"]["train"] == {"epochs": 1}
    rows = {row["_step"]: row for row in run["history"]}
    assert sorted(rows) == [1, 2] and rows[2]["total_loss"] == 0.5
    assert rows[1]["total_loss"] == 1.0  # both calls at step 1 are one row
    row = rows[1]  # nested values come back flattened, KEY/FIELD
    assert row["media/reconstructions/_type"] == "image-file" and row["media/reconstructions/caption"] == "grid"
    png = run_file.parent / "files" / row["media/reconstructions/path"]
    assert np.array_equal(np.asarray(PILImage.open(png)), grid.array)  # W&B's own copy of the image
    assert row["media/captions/_type"] == "table-file" and row["media/captions/nrows"] == 1
    assert run["summary"]["status"] == "finished"
    assert loggers.state_dict() == {"wandb": {"run_id": run["run_id"]}}


def test_a_continued_run_resumes_the_run_id_and_the_report_lists_every_attempt(tmp_path):
    first = WandbLogger(tmp_path, WandbConfig(mode="offline"))
    first.open({}, None)
    first.log({"loss": 1.0}, 1)
    first.close()
    run_id, first_dir = first.run_id, first.run_dir
    assert first.report_lines() == [f"W&B run:    {first_dir}  (offline; upload with: wandb sync {first_dir})"]
    again = Loggers([WandbLogger(tmp_path, WandbConfig(mode="offline"))])
    again.load_state_dict({"wandb": {"run_id": run_id}})
    again.open({}, resume_step=1)
    again.log({"loss": 0.5}, 2)
    again.close()
    second = again.get("wandb")
    assert second.run_id == run_id and second.run_dir != first_dir
    attempts = sorted([first_dir, second.run_dir])
    assert [p.parent for p in written_runs(tmp_path)] == attempts
    assert again.report_lines() == [f"W&B run:    {second.run_dir}  (offline, 2 attempts; upload all with one "
                                    f"command: wandb sync {attempts[0]} {attempts[1]})"]


def test_a_disabled_attempt_keeps_the_run_id_to_continue():
    logger = WandbLogger(Path("unused"), WandbConfig(mode="disabled"))
    logger.load_state_dict({"run_id": "abc123"})
    logger.open({}, resume_step=4)
    logger.close()
    assert logger.mode == "disabled" and logger.state_dict() == {"run_id": "abc123"}
    assert logger.report_lines() == ["W&B:        disabled"]


def test_online_report_line_is_the_url():
    logger = WandbLogger(Path("out"), WandbConfig())
    logger.mode, logger.run_dir, logger.url = "online", Path("out/wandb/run-x-abc"), "https://wandb.ai/e/p/runs/abc"
    assert logger.report_lines() == ["W&B run:    https://wandb.ai/e/p/runs/abc"]
    logger.url = None
    assert logger.report_lines() == ["W&B run:    out/wandb/run-x-abc"]


@pytest.mark.parametrize("setting", ["false", "true", "auto"])
def test_the_wandb_system_monitor_follows_wandb_system_metrics(tmp_path, setting):
    # Off on a CPU-only machine under auto: W&B's sampler process took 12-20% of a 2-core laptop step.
    import torch

    logger = WandbLogger(tmp_path, WandbConfig(mode="offline", system_metrics=setting))
    logger.open({"x": 1}, None)
    try:
        runs_monitor = {"true": True, "false": False, "auto": torch.cuda.is_available()}[setting]
        assert logger._run.settings.x_disable_stats is (not runs_monitor)
    finally:
        logger.close()
