"""The logger container and the jsonl, TensorBoard and CSV sinks, with real files read back.

The container's own rules (step order, media routing, switching a failing sink off) are checked
with a recording sink that implements our ``BaseLogger`` interface next to the real jsonl sink.
TensorBoard output is read back with TensorBoard's own ``EventAccumulator``.
"""

import csv
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, read_jsonl
from PIL import Image as PILImage

from mmtrain.config import WandbConfig
from mmtrain.errors import ConfigError
from mmtrain.loggers import BaseLogger, Image, Loggers, Table, build_loggers
from mmtrain.loggers.csv_logger import CsvLogger
from mmtrain.loggers.jsonl import JsonlLogger
from mmtrain.loggers.tensorboard_logger import TensorBoardLogger


class Recording(BaseLogger):
    """A sink that records every call; ``fail_on`` = {method: call number that raises}."""

    def __init__(self, name="rec", takes_media=False, essential=False, fail_on=None, state=None):
        self.name, self.takes_media, self.essential = name, takes_media, essential
        self.fail_on, self.state = fail_on or {}, state or {}
        self.calls: list[tuple] = []

    def _record(self, method, *args):
        self.calls.append((method, *args))
        if sum(c[0] == method for c in self.calls) == self.fail_on.get(method):
            raise OSError(f"{self.name} {method} broke\non two lines")

    def open(self, run_config, resume_step):
        self._record("open", resume_step)

    def log(self, record, step):
        self._record("log", dict(record), step)

    def summary(self, values):
        self._record("summary", dict(values))

    def flush(self):
        self._record("flush")

    def close(self):
        self._record("close")

    def report_lines(self):
        return [f"{self.name}: here"]

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        self.state = dict(state)

    def logged(self):
        return [(c[2], c[1]) for c in self.calls if c[0] == "log"]


def opened(*sinks, resume_step=None) -> Loggers:
    loggers = Loggers(list(sinks))
    loggers.open({"x": 1}, resume_step)
    return loggers


def image(h=6, w=8, channels=3, seed=0) -> Image:
    shape = (h, w) if channels == 1 else (h, w, channels)
    return Image(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), caption=f"seed {seed}")


# ---- the container --------------------------------------------------------------------------------


def test_steps_out_of_order_are_refused_and_reach_no_sink(tmp_path):
    rec = Recording()
    loggers = opened(JsonlLogger(tmp_path), rec)
    loggers.log({"a": 1}, step=3)
    loggers.log({"b": 2}, step=3)  # the same step, before a flush: merged
    with pytest.raises(RuntimeError, match=r"record for step 2 after step 3 was logged: the caller must read out "
                                           r"late events before logging a later step \(keys: c, z\)"):
        loggers.log({"z": 0, "c": 3}, step=2)
    loggers.flush()
    with pytest.raises(RuntimeError, match="step 3 after step 3"):  # a flushed step is closed
        loggers.log({"c": 3}, step=3)
    loggers.log({"d": 4}, step=4)
    loggers.close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 3, "a": 1, "b": 2}, {"step": 4, "d": 4}]
    assert rec.logged() == [(3, {"a": 1}), (3, {"b": 2}), (4, {"d": 4})]


def test_a_continued_run_may_log_at_its_checkpoint_step_but_not_before(tmp_path):
    """A checkpoint saved at an epoch's last step, before its validation, logs the epoch record at
    that step when continued; earlier steps are closed."""
    loggers = opened(JsonlLogger(tmp_path), resume_step=5)
    with pytest.raises(RuntimeError, match="step 4 after step 5"):
        loggers.log({"a": 1}, step=4)
    loggers.log({"e": 2}, step=5)
    loggers.log({"a": 1}, step=6)
    loggers.close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 5, "e": 2}, {"step": 6, "a": 1}]


def test_jsonl_merges_a_step_into_one_line_written_when_the_next_step_comes(tmp_path):
    loggers = opened(JsonlLogger(tmp_path))
    loggers.log({"total_loss": 1.5, "nan": float("nan")}, step=1)
    loggers.log({"val/total_loss": 2.0, "inf": float("inf"), "-inf": float("-inf")}, step=1)
    assert not (tmp_path / "metrics.jsonl").exists()  # step 1 may still get records
    loggers.log({"total_loss": 1.0}, step=2)
    assert read_jsonl(tmp_path / "metrics.jsonl") == [
        {"step": 1, "total_loss": 1.5, "nan": None, "val/total_loss": 2.0, "inf": 1e308, "-inf": -1e308}]
    loggers.flush()  # writes the pending line
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
    loggers.log({"total_loss": 0.5}, step=3)
    loggers.summary({"status": "finished", "best": float("nan")})
    loggers.close()  # writes the last line
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"status": "finished", "best": None}


def test_media_go_only_to_sinks_that_take_them(tmp_path):
    plain, media = Recording("plain"), Recording("media", takes_media=True)
    loggers = opened(JsonlLogger(tmp_path), plain, media)
    grid, grey = image(seed=1), image(channels=1, seed=2)
    table = Table(["image", "text"], [[grey, "a caption"]])
    loggers.log({"loss": 1.0, "media/reconstructions": grid}, step=1)
    loggers.log({"media/captions": table}, step=2)  # nothing left for a plain sink: not called
    loggers.close()
    assert plain.logged() == [(1, {"loss": 1.0})]
    assert media.logged() == [(1, {"loss": 1.0, "media/reconstructions": grid}), (2, {"media/captions": table})]
    # jsonl takes media too: PNG files, with the reference in the line
    first, second = read_jsonl(tmp_path / "metrics.jsonl")
    ref = first["media/reconstructions"]
    assert ref == {"_type": "image-file", "path": "media/reconstructions/step_00000001.png", "caption": "seed 1"}
    assert np.array_equal(np.asarray(PILImage.open(tmp_path / ref["path"])), grid.array)
    ref = second["media/captions"]
    assert ref["_type"] == "table-file" and ref["nrows"] == 1
    saved = json.loads((tmp_path / ref["path"]).read_text())
    assert saved["columns"] == ["image", "text"] and saved["data"][0][1] == "a caption"
    assert np.array_equal(np.asarray(PILImage.open(tmp_path / saved["data"][0][0]["path"])), grey.array)


def test_an_image_is_encoded_to_png_once_losslessly_for_every_sink(tmp_path):
    grid = image(seed=3)
    png = grid.png()
    assert grid.png() is png  # cached: the jsonl and W&B sinks share one encoding
    assert np.array_equal(np.asarray(PILImage.open(io.BytesIO(png))), grid.array)
    assert grid == Image(grid.array, grid.caption)  # the cache is not part of the value


@pytest.mark.parametrize("method", ["open", "log", "summary", "flush"])
def test_a_failing_sink_is_switched_off_with_one_warning_and_the_rest_go_on(tmp_path, method):
    bad, good = Recording("bad", fail_on={method: 1}), Recording()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loggers = opened(JsonlLogger(tmp_path), bad, good)
        for step in range(1, 5):
            loggers.log({"loss": float(step)}, step=step)
            loggers.summary({"step": step})
            loggers.flush()
        loggers.close()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"logger bad: {method} failed (OSError: bad {method} broke on two lines)")
    assert "\n" not in messages[0]
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    assert [s for s, _ in good.logged()] == [1, 2, 3, 4]
    failed_at = next(i for i, c in enumerate(bad.calls) if c[0] == method)
    assert [c[0] for c in bad.calls[failed_at + 1:]] == ["close"]  # no call after the failure but the last close
    assert loggers.report_lines() == [f"bad: here  (incomplete: bad failed in {method})", "rec: here"]


def test_a_sink_failing_in_close_is_warned_about_once(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loggers = opened(JsonlLogger(tmp_path), Recording("bad", fail_on={"close": 1}))
        loggers.log({"loss": 1.0}, step=1)
        loggers.close()
    assert [str(w.message).split(" (")[0] for w in caught] == ["logger bad: close failed"]
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}]


def test_an_essential_sink_failing_stops_the_run(tmp_path):
    with pytest.raises(OSError, match="broke"):
        opened(Recording("must", essential=True, fail_on={"flush": 1})).flush()
    # the real jsonl sink: metrics.jsonl cannot be written (a directory stands in for a full disk)
    (tmp_path / "metrics.jsonl").mkdir()
    loggers = opened(JsonlLogger(tmp_path), Recording())
    loggers.log({"loss": 1.0}, step=1)
    with pytest.raises(IsADirectoryError):
        loggers.log({"loss": 2.0}, step=2)  # writes step 1's line


def test_an_empty_container_does_nothing(tmp_path):
    loggers = Loggers([])
    loggers.open({"x": 1}, resume_step=3)
    loggers.log({"loss": 1.0, "img": image()}, step=5)
    loggers.log({"loss": 1.0}, step=2)  # no order to keep where nothing is written
    loggers.summary({"a": 1})
    loggers.flush()
    loggers.close()
    assert loggers.report_lines() == [] and loggers.state_dict() == {} and loggers.get("wandb") is None
    loggers.load_state_dict({"wandb": {"run_id": "abc"}})


def test_state_of_each_sink_round_trips_by_name():
    with_state, without = Recording("a", state={"run_id": "r1"}), Recording("b")
    loggers = Loggers([with_state, without])
    assert loggers.state_dict() == {"a": {"run_id": "r1"}}  # sinks without state are left out
    fresh_a, fresh_b = Recording("a"), Recording("b")
    again = Loggers([fresh_a, fresh_b])
    again.load_state_dict(json.loads(json.dumps(loggers.state_dict())))
    assert fresh_a.state == {"run_id": "r1"} and fresh_b.state == {}
    assert again.get("a") is fresh_a and again.get("c") is None


# ---- build_loggers --------------------------------------------------------------------------------


def test_build_loggers_order_and_ranks(tmp_path):
    out = tmp_path / "run"
    cfg = WandbConfig(mode="offline")
    loggers = build_loggers(True, out, ["csv", "wandb", "tensorboard"], cfg, ["val/*"])
    assert [s.name for s in loggers.sinks] == ["jsonl", "csv", "wandb", "tensorboard"]
    assert loggers.get("wandb").mode == "disabled" and loggers.get("wandb").epoch_metrics == ["val/*"]
    assert not out.exists()  # constructing starts nothing: no folder, no W&B run
    assert [s.name for s in build_loggers(True, out, [], cfg, []).sinks] == ["jsonl"]
    assert build_loggers(False, out, ["wandb", "csv"], cfg, []).sinks == []


@pytest.mark.parametrize(("is_main", "names", "bad"), [(True, ["wandb", "tensorbord"], "'tensorbord'"),
                                                        (False, ["jsonl"], "'jsonl'"),
                                                        (True, ["csv", "csv"], "['csv', 'csv']")])
def test_build_loggers_refuses_unknown_or_repeated_names(tmp_path, is_main, names, bad):
    with pytest.raises(ConfigError, match=r"^log\.loggers must") as raised:
        build_loggers(is_main, tmp_path, names, WandbConfig(mode="disabled"), [])
    assert bad in str(raised.value)
    if "tensorbord" in bad:
        assert "wandb, tensorboard, csv" in str(raised.value)


def test_importing_the_package_imports_no_backend():
    code = ("import sys, mmtrain.loggers, mmtrain.loggers.base; "
            "print(sorted(m for m in ('wandb', 'tensorboard', 'accelerate', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out


# ---- TensorBoard ----------------------------------------------------------------------------------


def read_tensorboard(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc, tag) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_tensorboard_has_every_scalar_and_image_at_its_step(tmp_path):
    records = {1: {"total_loss": 2.5, "lr": 1e-4, "grad/norm": 3}, 2: {"total_loss": 2.25, "note": "skipped"},
               4: {"total_loss": 1.75, "val/total_loss": 1.9, "epoch": 1, "nonfinite_step": True}}
    grid, grey = image(seed=3), image(5, 7, channels=1, seed=4)
    tb = opened(TensorBoardLogger(tmp_path))
    for step, record in records.items():
        tb.log(record, step)
    tb.log({"media/reconstructions": grid, "media/captions": Table(["image", "text"], [[grey, "x|y"]])}, step=4)
    tb.summary({"best_validation_loss": 1.9, "status": "finished"})
    tb.close()
    acc = read_tensorboard(tmp_path / "tensorboard")
    expected: dict[str, dict[int, float]] = {}
    for step, record in records.items():
        for key, value in record.items():
            if not isinstance(value, str):
                expected.setdefault(key, {})[step] = float(value)
    assert set(acc.Tags()["scalars"]) == {*expected, "summary/best_validation_loss"}
    for key, values in expected.items():
        got = scalars(acc, key)
        assert got.keys() == values.keys(), key
        assert all(np.float32(got[s]) == np.float32(v) for s, v in values.items()), (key, got, values)
    assert scalars(acc, "summary/best_validation_loss") == {4: pytest.approx(1.9)}
    for tag, img in [("media/reconstructions", grid), ("media/captions/0", grey)]:
        (event,) = acc.Images(tag)
        assert event.step == 4 and (event.height, event.width) == img.array.shape[:2]
        decoded = np.asarray(PILImage.open(__import__("io").BytesIO(event.encoded_image_string)))
        assert np.array_equal(decoded[..., 0] if img.array.ndim == 2 and decoded.ndim == 3 else decoded, img.array)
    (text,) = acc.Tensors("media/captions/text_summary")
    assert text.step == 4 and text.tensor_proto.string_val[0].decode() == \
        "| image | text |\n|---|---|\n| (image: seed 4) | x\\|y |"
    assert tb.report_lines() == [f"TensorBoard: {tmp_path / 'tensorboard'}  (view with: tensorboard --logdir "
                                 f"{tmp_path / 'tensorboard'})"]


def test_tensorboard_resume_purges_the_interrupted_attempts_later_steps(tmp_path):
    first = opened(TensorBoardLogger(tmp_path))
    for step in range(1, 7):
        first.log({"loss": float(step), "other": step * 2.0}, step)
    first.log({"media/reconstructions": image()}, 6)
    first.close()  # the interrupted attempt: its checkpoint was at step 3
    again = opened(TensorBoardLogger(tmp_path), resume_step=3)
    for step in (4, 5):
        again.log({"loss": step * 10.0}, step)
    again.close()
    acc = read_tensorboard(tmp_path / "tensorboard")
    assert scalars(acc, "loss") == {1: 1.0, 2: 2.0, 3: 3.0, 4: 40.0, 5: 50.0}  # step 6 gone, 4-5 replaced
    assert scalars(acc, "other") == {1: 2.0, 2: 4.0, 3: 6.0}  # purged for every tag, not only those logged again
    assert acc.Images("media/reconstructions") == []


# ---- CSV ------------------------------------------------------------------------------------------


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


def test_csv_has_one_row_per_number(tmp_path):
    logger = opened(CsvLogger(tmp_path))
    logger.log({"total_loss": 2.5, "status": "ok", "lr": np.float32(0.5), "media/x": image()}, step=1)
    logger.log({"total_loss": 0.1 + 0.2, "val/total_loss": float("nan"), "epoch": 1, "nonfinite_step": True}, 2)
    logger.flush()
    assert read_csv(tmp_path / "metrics.csv") == [
        ["step", "name", "value"], ["1", "total_loss", "2.5"], ["1", "lr", "0.5"],
        ["2", "total_loss", repr(0.1 + 0.2)], ["2", "val/total_loss", "nan"], ["2", "epoch", "1"],
        ["2", "nonfinite_step", "1"]]
    logger.close()
    import pandas as pd  # the read the module docstring documents

    wide = pd.read_csv(tmp_path / "metrics.csv").pivot_table(index="step", columns="name", values="value",
                                                             aggfunc="last", dropna=False)
    assert wide.loc[2, "total_loss"] == 0.1 + 0.2 and wide.loc[1, "lr"] == 0.5
    assert logger.report_lines() == [f"CSV:        {tmp_path / 'metrics.csv'}"]


def test_csv_resume_keeps_rows_up_to_the_checkpoint_and_drops_a_torn_line(tmp_path):
    first = opened(CsvLogger(tmp_path))
    for step in range(1, 7):
        first.log({"loss": float(step)}, step)
    first.close()
    with (tmp_path / "metrics.csv").open("a") as f:
        f.write("7,loss,0.12")  # a kill in the middle of a row: no line end
    assert read_csv(tmp_path / "metrics.csv")[-1] == ["7", "loss", "0.12"]
    again = opened(CsvLogger(tmp_path), resume_step=4)
    assert [r[0] for r in read_csv(tmp_path / "metrics.csv")[1:]] == ["1", "2", "3", "4"]
    again.log({"loss": 50.0}, 5)
    again.close()
    assert read_csv(tmp_path / "metrics.csv") == [["step", "name", "value"], *[[str(s), "loss", f"{s:.1f}"]
                                                                               for s in range(1, 5)],
                                                  ["5", "loss", "50.0"]]
    # a torn line is dropped even where it still reads as a row (3,loss,2 of 3,loss,2.5), and a fresh
    # run starts a new file
    with (tmp_path / "metrics.csv").open("a") as f:
        f.write("3,loss,2")
    opened(CsvLogger(tmp_path), resume_step=10).close()
    assert [r[0] for r in read_csv(tmp_path / "metrics.csv")[1:]] == ["1", "2", "3", "4", "5"]
    opened(CsvLogger(tmp_path)).close()
    assert read_csv(tmp_path / "metrics.csv") == [["step", "name", "value"]]


def test_the_state_of_a_sink_not_run_this_session_is_carried_on(tmp_path):
    """A session without W&B (log.loggers csv) must not cost the next session its W&B run id."""
    loggers = Loggers([JsonlLogger(tmp_path)])
    loggers.load_state_dict({"wandb": {"run_id": "abc123"}})
    assert loggers.state_dict() == {"wandb": {"run_id": "abc123"}}
