"""The data pipeline's speed levers: data.num_workers auto, the decode cache (data.decode_cache), and the
benchmark that measures them (benchmarks/bench_data.py). Speed itself is measured by the benchmark, not
asserted here: these tests check the choices and that the fast path yields exactly the slow path's data."""

import dataclasses
import os
import sys

import pytest
import torch
from conftest import REPO, TINY, reset_accelerate, tiny_config

from mmtrain import decoded as decoded_module
from mmtrain.cli import main
from mmtrain.config import DataConfig, build_config
from mmtrain.data import build_dataloader, load_splits, pixel_transform, undecoded
from mmtrain.decoded import DECODE_CACHE_AUTO_BYTES, decode_once, decoded_bytes, wants_decode_cache
from mmtrain.errors import ConfigError
from mmtrain.loader_settings import auto_num_workers, loader_settings, usable_cores
from mmtrain.tokenizer import build_tokenizer
from mmtrain.trainer import Trainer


@pytest.mark.parametrize(("device", "cores", "processes", "workers"), [
    ("cpu", 2, 1, 0),     # the laptop: the step needs both cores
    ("cpu", 7, 1, 0),
    ("cpu", 8, 1, 1),     # one core in eight for decoding
    ("cpu", 32, 1, 4),
    ("cpu", 16, 4, 0),    # 4 ranks on 16 cores: 4 cores each
    ("cuda", 16, 1, 8),   # capped at 8
    ("cuda", 4, 1, 3),    # one core stays with the training process
    ("cuda", 64, 8, 7),   # 8 GPUs share the node's 64 cores
    ("cuda", 1, 1, 0),
    ("cuda", 2, 4, 0),    # more ranks than cores
    ("mps", 2, 1, 0),     # not CUDA: the CPU rule
])
def test_auto_num_workers_by_device_cores_and_processes(device, cores, processes, workers):
    assert auto_num_workers(device, cores, processes) == workers


def test_num_workers_is_auto_by_default_and_explicit_numbers_stay_ints():
    assert DataConfig().num_workers == "auto"
    assert build_config(overrides={"data.num_workers": "3"}).data.num_workers == 3
    assert build_config(overrides={"data.num_workers": 0}).data.num_workers == 0
    for bad in ("-1", "many", "1.5"):
        with pytest.raises(ConfigError, match=r"data\.num_workers must be auto or a whole number >= 0"):
            build_config(overrides={"data.num_workers": bad})


def test_bad_num_workers_on_the_command_line_is_one_line(tmp_path, capsys):
    code = main(["train", "--config", str(TINY), "--train.output_dir", str(tmp_path / "run"),
                 "--data.num_workers", "several"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "data.num_workers must be auto or a whole number" in err and "'several'" in err


def test_loader_settings_resolve_auto_from_this_machine(monkeypatch):
    model = tiny_config("unused").model
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # what torchrun / accelerate launch set for 2 ranks per machine
    auto = loader_settings(DataConfig(), model, "cpu", 2, rows=100)
    assert auto.num_workers == auto_num_workers("cpu", usable_cores(), 2)
    assert f"{usable_cores()} core(s), 2 process(es)" in auto.line() and not auto.pin_memory
    assert auto.decode_cache and auto.as_config()["data_decode_cache"] is True
    explicit = loader_settings(DataConfig(num_workers="3", decode_cache="false"), model, "cuda", 1, rows=100)
    assert (explicit.num_workers, explicit.pin_memory, explicit.decode_cache) == (3, True, False)


def test_decode_cache_auto_threshold():
    model = tiny_config("unused").model  # 1 x 32 x 32 float32: 4096 bytes a decoded image
    fits = DECODE_CACHE_AUTO_BYTES // decoded_bytes(1, model)
    assert decoded_bytes(fits, model) <= DECODE_CACHE_AUTO_BYTES < decoded_bytes(fits + 1, model)
    assert wants_decode_cache("auto", fits, model) and not wants_decode_cache("auto", fits + 1, model)
    assert wants_decode_cache("true", fits + 1, model) and not wants_decode_cache("false", 1, model)


@pytest.fixture(scope="module")
def tiny_data():
    cfg = tiny_config("unused")
    train, val = load_splits(cfg.data, cfg.model)
    tokenizer = build_tokenizer(train["caption"], cfg.model.max_caption_length, 1)
    return cfg, train, val, tokenizer


def _batches(loader):
    return [batch for batch in loader]


def test_decode_cache_yields_the_on_the_fly_batches_exactly(tiny_data):
    cfg, train, val, tok = tiny_data
    for ds, shuffle, workers in ((train, True, 1), (val, False, 0)):  # a worker unpickles the cached view
        fly = _batches(build_dataloader(ds, tok, cfg.model, 16, 0, shuffle=shuffle, seed=7))
        cached = _batches(build_dataloader(ds, tok, cfg.model, 16, workers, shuffle=shuffle, seed=7,
                                           decoded=decode_once(ds, cfg.model, "split")))
        assert len(fly) == len(cached) == -(-len(ds) // 16)
        for a, b in zip(fly, cached, strict=True):
            assert a.keys() == b.keys()
            for key in a:
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_changed_size_channels_or_decoder_makes_a_new_cache(tiny_data, monkeypatch):
    cfg, train, _, _ = tiny_data
    first = decode_once(train, cfg.model, "train")
    assert decode_once(train, cfg.model, "train").cache_files == first.cache_files  # the same settings: reused
    files = {first.cache_files[0]["filename"]}
    for model in (dataclasses.replace(cfg.model, image_size=16), dataclasses.replace(cfg.model, image_channels=3)):
        again = decode_once(train, model, "train")
        files.add(again.cache_files[0]["filename"])
        c, s = model.image_channels, model.image_size
        expected = pixel_transform(s, c, model.image_background)
        for row in (0, len(train) - 1):
            pixels = torch.tensor(again[row]["pixel_values"]).view(c, s, s)
            assert torch.equal(pixels, expected(undecoded(train)[row]["image"]))
    monkeypatch.setattr(decoded_module, "decoder_version", lambda: "another decoder")
    files.add(decode_once(train, cfg.model, "train").cache_files[0]["filename"])
    assert len(files) == 4, files


def test_training_is_bit_identical_with_and_without_decode_cache(tmp_path, capsys):
    """The same 3 optimizer steps, pixels decoded every time or read from the cache: the same weights."""
    weights = []
    for cache in ("false", "true"):
        trainer = Trainer(tiny_config(tmp_path / cache, **{"data.decode_cache": cache, "train.max_steps": 3,
                                                           "wandb.mode": "disabled", "wandb.media_samples": 0}))
        assert trainer.data.loader.decode_cache is (cache == "true")
        trainer.train_epoch(0)
        weights.append(trainer.accelerator.unwrap_model(trainer.model).state_dict())
        trainer.loggers.close()
        reset_accelerate()
    assert "images decoded once (decode cache)" in capsys.readouterr().out
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_bench_data_smoke():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_data

    report = bench_data.run(["--preset", "tiny", "--train-size", "48", "--val-size", "16", "--rounds", "1",
                             "--batches", "2", "--steps", "1", "--workers", "0", "--trainer-workers"])
    assert "| generate the synthetic set (64 images, 32 px), fresh cache folder |" in report
    assert "| loader: 0 worker(s), decode cache |" in report
    rows = [line for line in report.splitlines() if line.startswith("| loader:")]
    assert len(rows) == 2 and all(float(line.split("|")[4]) > 0 for line in rows)


def test_an_image_replaced_with_its_mtime_kept_is_decoded_again(tmp_path):
    # An image folder's datasets fingerprint tracks paths and mtimes only: `cp -p` of another picture
    # over a file must still give its new pixels, as the on-the-fly path does.
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, shade in enumerate((30, 200, 90, 140)):
        Image.new("L", (40, 40), shade).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text("".join(f'{{"file_name": "{i}.png", "caption": "picture {i}"}}\n'
                                                   for i in range(4)))
    cfg = build_config({"data": {"source": "imagefolder", "path": str(folder), "val_fraction": 0.25},
                        "model": {"image_size": 32, "image_channels": 1}})

    def cached_and_fresh():
        train = load_splits(cfg.data, cfg.model).train
        cached = decode_once(train, cfg.model, "train")
        fresh = pixel_transform(32, 1, cfg.model.image_background)
        return [(torch.tensor(cached[r]["pixel_values"]).view(1, 32, 32), fresh(undecoded(train)[r]["image"]))
                for r in range(len(train))]

    assert all(torch.equal(a, b) for a, b in cached_and_fresh())
    target = folder / "1.png"
    stat = target.stat()
    Image.new("L", (40, 40), 250).save(target)  # new content, same size (a flat PNG) ...
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... and the old mtime, as cp -p leaves it
    assert all(torch.equal(a, b) for a, b in cached_and_fresh())
