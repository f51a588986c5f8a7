"""W&B outages never stop training: real tiny runs with only the failing W&B call faked.

Each test trains in process with real wandb (offline runs really start and write their files);
``monkeypatch`` replaces only what cannot happen here: a server that refuses or never answers,
and a run whose calls raise. Every test checks that metrics.jsonl holds every optimizer step and
that exactly one warning about W&B was given.
"""

import threading
import time
import warnings

import pytest
import torch
import wandb
from conftest import read_jsonl, tiny_config
from wandb_files import offline_runs, read_run, record_modes

from mmtrain.loggers.wandb_logger import WandbLogger
from mmtrain.trainer import Trainer

FAKE_KEY = "x" * 40
STEPS = list(range(1, 7))  # tiny.yaml: 96 samples / batch 16 = 6 optimizer steps in the one epoch
real_init = wandb.init


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """A tiny model gains nothing from intra-op threads, and on a busy 2-core machine their spinning
    makes these runs several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train(out, **overrides):
    """One tiny epoch, logging every step; returns (trainer, the W&B warnings it gave)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(tiny_config(out, **{"train.epochs": 1, "wandb.log_frequency": 1, **overrides}))
        trainer.fit()
    trainer.accelerator.end_training()
    return trainer, [str(w.message) for w in caught if "W&B" in str(w.message)]


def assert_metrics_complete(out):
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == STEPS
    assert all("total_loss" in r for r in records)
    assert "val/total_loss" in records[-1]
    assert (out / "summary.json").is_file()


def written_runs(out):
    """The offline run files, once wandb-core has written them out: run.finish returns before its
    writer has closed the file, so end the wandb session (it waits for wandb-core) before reading."""
    wandb.teardown()
    return offline_runs(out)


def test_online_init_failure_falls_back_to_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)  # credentials exist, so online is really attempted
    modes = record_modes(monkeypatch, fail_modes=("online",))
    trainer, warned = train(tmp_path, **{"wandb.mode": "online"})
    assert modes == ["online", "offline"]
    assert trainer.loggers.get("wandb").mode == "offline"
    runs = written_runs(tmp_path)
    assert len(runs) == 1 and trainer.loggers.get("wandb").run_dir == runs[0].parent
    assert sorted(h["_step"] for h in read_run(runs[0])["history"]) == STEPS  # the offline run got everything
    assert_metrics_complete(tmp_path)
    assert len(warned) == 1 and "online" in warned[0] and "offline" in warned[0], warned


def test_init_failing_everywhere_disables_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    modes = record_modes(monkeypatch, fail_modes=("online", "offline"))
    trainer, warned = train(tmp_path, **{"wandb.mode": "online"})
    assert modes == ["online", "offline"]
    assert trainer.loggers.get("wandb").mode == "disabled" and trainer.loggers.get("wandb").run_dir is None
    assert offline_runs(tmp_path) == []
    assert_metrics_complete(tmp_path)
    assert len(warned) == 1 and "disabled" in warned[0], warned


class LateRun:
    """What a hung wandb.init finally returns, after the tracker stopped waiting for it."""

    def __init__(self):
        self.finished = threading.Event()

    def finish(self):
        self.finished.set()


def test_hanging_init_is_bounded_and_disables_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setattr(WandbLogger, "init_grace_s", 1.0)  # the bound is 1 + 1 s: a fast test, the same code path
    release, late = threading.Event(), LateRun()
    modes = record_modes(monkeypatch, block=release, returns=late)
    start = time.perf_counter()
    trainer, warned = train(tmp_path, **{"wandb.mode": "online", "wandb.init_timeout": 1})
    elapsed = time.perf_counter() - start
    assert elapsed < 30, elapsed  # bounded by init_timeout + WandbLogger.init_grace_s, not by the 60 s hang
    assert modes == ["online"]  # no second wandb.init while the first is stuck in wandb's global state
    assert trainer.loggers.get("wandb").mode == "disabled"
    assert_metrics_complete(tmp_path)
    assert len(warned) == 1 and "no answer" in warned[0] and "disabled" in warned[0], warned
    release.set()  # the stuck init returns at last: its run must be finished, not left attached
    assert late.finished.wait(10)


def test_failing_log_keeps_training(tmp_path, monkeypatch):
    calls = []

    def init(*args, **kwargs):
        run = real_init(*args, **kwargs)
        real_log = run.log

        def log(*a, **kw):
            calls.append(kw["step"])
            if len(calls) == 2:
                raise ConnectionResetError("wandb-core went away")
            return real_log(*a, **kw)

        run.log = log
        return run

    monkeypatch.setattr(wandb, "init", init)
    trainer, warned = train(tmp_path)
    assert calls == [1, 2]  # W&B is off after the failure: no call per later step
    assert trainer.loggers.get("wandb").mode == "disabled"
    assert wandb.run is None  # the dropped run was finished, not left for the next wandb.init to return
    assert_metrics_complete(tmp_path)
    assert len(warned) == 1 and "log failed" in warned[0], warned
    (run_file,) = written_runs(tmp_path)  # the dropped run was closed: what it got is readable
    assert [h["_step"] for h in read_run(run_file)["history"]] == [1]


@pytest.mark.parametrize("call", ["define_metric", "summary", "finish"])
def test_failing_run_calls_keep_training(tmp_path, monkeypatch, call):
    def init(*args, **kwargs):
        run = real_init(*args, **kwargs)

        def fail(*a, **kw):
            raise RuntimeError(f"{call} broke")

        if call == "summary":  # Summary turns attribute assignment into a summary key: patch its class
            monkeypatch.setattr(type(run.summary), "update", fail)
        else:
            monkeypatch.setattr(run, call, fail)
        return run

    monkeypatch.setattr(wandb, "init", init)
    trainer, warned = train(tmp_path)
    assert_metrics_complete(tmp_path)
    assert len(warned) == 1 and f"{call} failed" in warned[0] and f"{call} broke" in warned[0], warned
    # A failing call switches W&B off; a failing finish comes last, when there is nothing left to switch off.
    assert trainer.loggers.get("wandb").mode == ("offline" if call == "finish" else "disabled")
    assert (wandb.run is None) is (call != "finish")  # a dropped run is still finished
    if call == "finish":  # the real finish, so no run stays active for the next test's wandb.init
        wandb.run.__class__.finish(wandb.run)


def test_hanging_finish_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(WandbLogger, "finish_timeout_s", 1.0)
    release = threading.Event()

    def init(*args, **kwargs):
        run = real_init(*args, **kwargs)
        real_finish = run.finish

        def finish(*a, **kw):  # a finish stuck uploading; it completes once released
            release.wait(60)
            return real_finish(*a, **kw)

        run.finish = finish
        return run

    monkeypatch.setattr(wandb, "init", init)
    start = time.perf_counter()
    _, warned = train(tmp_path)
    assert time.perf_counter() - start < 30
    assert_metrics_complete(tmp_path)
    assert len(warned) == 1 and "finish failed" in warned[0] and "wandb sync" in warned[0], warned
    release.set()  # let the stuck finish complete, so no run stays active for the next test
    for thread in threading.enumerate():
        if thread.name == "mmtrain-wandb-finish":
            thread.join(30)
    assert wandb.run is None


def test_online_without_credentials_runs_offline(tmp_path, monkeypatch):
    modes = record_modes(monkeypatch)  # conftest removed WANDB_API_KEY and points NETRC at no file
    trainer, warned = train(tmp_path, **{"wandb.mode": "online"})
    assert modes == ["offline"]  # online was never attempted
    assert trainer.loggers.get("wandb").mode == "offline" and len(offline_runs(tmp_path)) == 1
    assert_metrics_complete(tmp_path)
    assert len(warned) == 1 and "credentials" in warned[0], warned
