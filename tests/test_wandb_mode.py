"""How ``WANDB_MODE`` and ``wandb.mode`` combine: under ``auto`` the env var wins; an explicit config
value wins otherwise; online without credentials never prompts, it logs offline with a warning.

The table checks the mode mmtrain asks ``wandb.init`` for. The real-run tests start real offline W&B
runs (conftest isolates W&B: no key, NETRC pointing at no file) and read the mode wandb recorded, so
they also pin wandb's own rule that ``wandb.init(mode=...)`` outranks ``WANDB_MODE``.
"""

import os
import pty
import select
import subprocess
import sys
import time
import warnings

import pytest
import wandb
from conftest import REPO
from wandb.proto import wandb_internal_pb2 as pb
from wandb_files import _payloads, offline_runs

from mmtrain.config import WandbConfig
from mmtrain.tracking import Tracker, resolve_mode

FAKE_KEY = "x" * 40
NO_CREDENTIALS = "no W&B credentials"
IGNORED = "is not online, offline or disabled"

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


def set_env(monkeypatch, wandb_mode, credentials):
    if wandb_mode is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", wandb_mode)
    if credentials:
        monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    else:  # conftest already removed it and points NETRC at a missing file
        monkeypatch.delenv("WANDB_API_KEY", raising=False)


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
    ("dryrun", "auto", "offline"),
    ("online", "auto", "offline"),     # online without credentials: offline, never a prompt
    ("disabled", "offline", "offline"),  # the explicit value wins, in wandb too
])
def test_real_run_mode(tmp_path, monkeypatch, env, config, asked):
    set_env(monkeypatch, env, credentials=False)
    wandb.teardown()  # wandb reads WANDB_MODE once per process, when its singleton is set up
    modes, real_init = [], wandb.init

    def init(*args, **kwargs):
        modes.append(kwargs["mode"])
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = Tracker(tmp_path, WandbConfig(mode=config), {"x": 1})
        assert wandb.setup().settings.mode == env  # wandb itself saw the env var...
        assert tracker._run.settings.mode == asked  # ...and still ran in the mode mmtrain passed
        tracker.log({"loss": 1.0}, step=1)
        tracker.finish()
    wandb.teardown()  # wait for wandb-core to write the run file out
    assert modes == [asked] and tracker.mode == asked
    runs = offline_runs(tmp_path)
    assert len(runs) == 1 and runs[0].parent == tracker.run_dir
    assert recorded_offline_flag(runs[0])
    warned = [str(w.message) for w in caught if "credentials" in str(w.message)]
    assert len(warned) == (1 if env == "online" else 0), warned


def test_explicit_disabled_starts_nothing(tmp_path, monkeypatch):
    set_env(monkeypatch, "offline", credentials=False)
    monkeypatch.setattr(wandb, "init", lambda *a, **k: pytest.fail("wandb.init called with wandb.mode=disabled"))
    tracker = Tracker(tmp_path, WandbConfig(mode="disabled"), {"x": 1})
    tracker.log({"loss": 1.0}, step=1)
    tracker.finish()
    assert tracker.mode == "disabled" and tracker.run_id is None
    assert not (tmp_path / "wandb").exists()
    assert (tmp_path / "metrics.jsonl").read_text().strip() == '{"step": 1, "loss": 1.0}'


def test_a_wandb_mode_wandb_rejects_disables_wandb_even_with_an_explicit_mode(tmp_path, monkeypatch):
    """wandb validates WANDB_MODE itself in every wandb.init, whatever mode= it is given."""
    set_env(monkeypatch, "bogus", credentials=False)
    wandb.teardown()  # a fresh wandb singleton reads WANDB_MODE
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = Tracker(tmp_path, WandbConfig(mode="offline"), {"x": 1})
        tracker.log({"loss": 1.0}, step=1)
        tracker.finish()
    wandb.teardown()
    assert tracker.mode == "disabled" and offline_runs(tmp_path) == []
    warned = [str(w.message) for w in caught if "W&B" in str(w.message)]
    assert len(warned) == 1 and "disabled" in warned[0] and "bogus" in warned[0], warned
    assert (tmp_path / "metrics.jsonl").read_text().strip() == '{"step": 1, "loss": 1.0}'


CHILD = """
import sys
from pathlib import Path
from mmtrain.config import WandbConfig
from mmtrain.tracking import Tracker
tracker = Tracker(Path(sys.argv[1]), WandbConfig(mode="auto", init_timeout=5), {})
print("MODE", tracker.mode, flush=True)
tracker.finish()
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
