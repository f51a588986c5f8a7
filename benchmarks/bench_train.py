"""Training throughput: mmtrain against the loop a user would otherwise write, Accelerate and Lightning.

    python benchmarks/bench_train.py                          # tiny and laptop presets on CPU (~4 min)
    python benchmarks/bench_train.py --presets laptop --rounds 30
    python benchmarks/bench_train.py --whole-runs --presets laptop   # one process per run: what a user pays
    python benchmarks/bench_train.py --gpu                    # configs/default.yaml in bf16, when CUDA is present
    python benchmarks/bench_train.py --presets tiny --rounds 1 --steps 2   # smoke: 2 steps per variant

Every variant trains the same model (``mmtrain.model.build_model`` from the preset, same seed) on the
same data (the preset's synthetic set at its full 4627 training samples, the images through mmtrain's
transform: the hand-written loops decode them in every epoch, as a user's ``with_transform`` does, mmtrain
reads its decode cache, bit-identical pixels, as its defaults choose; ``--user-data decoded`` gives the
other variants the decode cache too, so that only the loops differ), on the same batches in the same
order (epoch ``e`` is the permutation
``randperm(n, seed + e)``, which is what mmtrain's seedable sampler draws; checked at start-up), in the
same precision (fp32 on CPU; ``--gpu``: bf16 autocast), with AdamW, gradient clipping at
``optim.max_grad_norm`` and the preset's warmup + cosine schedule, sized to the same number of steps:

* ``plain``: a hand-written PyTorch loop: torch DataLoader, ``torch.optim.AdamW`` (torch's default
  implementation for the device: on CPU the per-parameter loop; ``--user-adamw fused`` gives plain,
  accelerate and lightning the fused kernel mmtrain uses), ``clip_grad_norm_``,
  ``zero_grad(set_to_none=True)``;
* ``accelerate``: the canonical loop of accelerate's ``examples/by_feature``: ``Accelerator()``,
  ``prepare``, ``accelerator.backward``, ``accelerator.clip_grad_norm_``, optimizer and scheduler step;
* ``mmtrain-off``: ``mmtrain.trainer.Trainer`` with ``wandb.telemetry false``, W&B disabled, no media;
* ``mmtrain-full``: the Trainer with full telemetry, ``wandb.log_frequency 10`` and media, W&B offline
  (``WANDB_MODE=offline`` in a temporary ``WANDB_DIR``; no key needed);
* ``lightning``: ``lightning.Trainer`` on a LightningModule around the same model, ``CSVLogger``
  (the loss logged every step, written every 10) and ``DeviceStatsMonitor``; only when ``lightning``
  is importable (``pip install -e .[bench]``), skipped with a printed line otherwise.

**In-process, interleaved (default).** Each variant runs its own natural, continuous loop (the
Trainer's ``train_epoch``, Lightning's ``fit``, the hand-written loops) in a thread of its own that
pauses after every ``--steps`` optimizer steps; only one runs at a time. So data iterators, Lightning's
fit loop and W&B's writer stay alive across blocks, as in a real run, and nothing is re-started per
block (a fresh iterator per block would make Accelerate's look-ahead load one batch too many). The
variants run in rounds of one block each, the order reversed every round; round 0 is warm-up and
not counted. Per variant: the median over rounds of samples/s and ms/step, and the peak RSS during
its blocks (the process high-water mark, reset through ``/proc/self/clear_refs`` before each block;
the variants share the process, so this holds all of them, and ``+MB`` is the peak above the RSS at
the block's start: the step's own transient memory). On GPU: ``max_memory_allocated`` during the
block. Ratios are to ``plain`` (higher is better for samples/s; ms/step and memory lower).

**Whole runs (``--whole-runs``).** In-process interleaving shares the allocator, caches and the
machine's state between the arms and leaves out start-up and teardown; the issue found that it
disagrees with whole runs for telemetry. Here each run is a separate process (this script with
``--child``) that builds its variant, trains N steps and closes (W&B finishes), timed from the outside.
Per variant: ``(T(N2) - T(N1)) / (N2 - N1)``, the marginal cost per step a user pays, from
``--repeats`` interleaved repeats (order reversed every repeat; medians), and the child's peak RSS
from its own ``VmHWM`` at exit (``ru_maxrss`` from ``os.wait4`` would not do: Linux carries the
pre-exec peak of the forked parent into it; W&B's service process is a process of its own, not counted).
"""

import argparse
import contextlib
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import torch
from torch.utils.data import DataLoader, Sampler

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmtrain.config import Config, load_config  # noqa: E402
from mmtrain.data import load_splits, make_transform, undecoded  # noqa: E402
from mmtrain.decoded import DecodedSamples, decode_once  # noqa: E402
from mmtrain.loader_settings import loader_settings  # noqa: E402
from mmtrain.model import build_model  # noqa: E402
from mmtrain.optim import parameter_groups  # noqa: E402
from mmtrain.tokenizer import build_tokenizer  # noqa: E402

VARIANTS = ("plain", "accelerate", "mmtrain-off", "mmtrain-full", "lightning")
TRAIN_SIZE, VAL_SIZE = 4627, 514  # the full synthetic set: cached after the first run, no epoch end in a block


def lightning_available() -> bool:
    try:
        import lightning  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------------
# What every variant shares: the config, the data, the schedule
# --------------------------------------------------------------------------------------------------

def bench_config(preset: str, out: Path, total_steps: int, precision: str, telemetry: bool = False) -> Config:
    """The preset at the full synthetic set, with a schedule sized to ``total_steps`` (the warmup cut so
    that it fits a short run) and nothing that is not the training step: no progress bar, no
    checkpoint inside the run."""
    base = load_config(REPO / "configs" / f"{preset}.yaml")
    overrides = {
        "train.output_dir": str(out), "train.overwrite": True, "train.progress_bar": False,
        "train.max_steps": total_steps, "train.epochs": 1000, "train.mixed_precision": precision,
        "optim.warmup_steps": min(base.optim.warmup_steps, max(0, total_steps - 2)),
        "data.synthetic_train_size": TRAIN_SIZE, "data.synthetic_val_size": VAL_SIZE,
        "checkpoint.every_steps": 0, "checkpoint.every_minutes": 0.0,
        "wandb.log_frequency": 10, "wandb.telemetry": telemetry, "wandb.mode": "offline" if telemetry else "disabled",
    }
    if not telemetry:
        overrides["wandb.media_samples"] = 0
    return load_config(REPO / "configs" / f"{preset}.yaml", overrides)


class EpochPermutation(Sampler[int]):
    """Epoch ``e`` is ``randperm(n)`` from a generator seeded ``seed + e``: the order of mmtrain's loader
    (Accelerate's SeedableRandomSampler with ``data_seed = train.seed``). ``set_epoch`` as usual."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        yield from torch.randperm(self.n, generator=g).tolist()


# The samples the non-mmtrain variants read: "on-the-fly" (default), what a user writes (a datasets
# with_transform decoding every image in every epoch); "decoded", mmtrain's decode cache (--user-data
# decoded), which leaves the loops alone in the comparison. mmtrain reads what its defaults choose.
USER_DATA = {"pipeline": "on-the-fly"}


class SharedData:
    """The training split and tokenizer as mmtrain builds them, and torch DataLoaders over them, with
    the worker count mmtrain's data.num_workers resolves to on this machine."""

    def __init__(self, cfg: Config, cuda: bool = False) -> None:
        self.cfg = cfg
        splits = load_splits(cfg.data, cfg.model)
        self.train = splits.train
        self.tokenizer = build_tokenizer(self.train["caption"], cfg.model.max_caption_length,
                                         cfg.data.min_word_frequency)
        if USER_DATA["pipeline"] == "decoded":
            self.view = DecodedSamples(decode_once(self.train, cfg.model, "train"), self.tokenizer, cfg.model)
        else:
            self.view = undecoded(self.train).with_transform(make_transform(self.tokenizer, cfg.model))
        self.workers = loader_settings(cfg.data, cfg.model, "cuda" if cuda else "cpu", 1,
                                       len(splits.train) + len(splits.val)).num_workers

    def loader(self, cuda: bool) -> tuple[DataLoader, EpochPermutation]:
        sampler = EpochPermutation(len(self.train), self.cfg.train.seed)
        workers = self.workers
        return DataLoader(self.view, batch_size=self.cfg.train.batch_size, sampler=sampler, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=cuda), sampler

    def model(self) -> torch.nn.Module:
        torch.manual_seed(self.cfg.train.seed)
        return build_model(self.cfg.model, len(self.tokenizer))


def cosine_schedule(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int):
    """The preset's schedule, written as a user would: transformers' warmup + cosine to min_lr."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=cfg.optim.warmup_steps, num_training_steps=total_steps - 1,
        min_lr_rate=cfg.optim.min_lr / cfg.optim.lr)


# The AdamW implementation of the non-mmtrain variants: torch's default for the device (on CPU the
# per-parameter loop; on CUDA foreach), or --user-adamw foreach / fused (what mmtrain uses).
USER_ADAMW = {"impl": "default"}


def user_adamw(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    o, impl = cfg.optim, USER_ADAMW["impl"]
    kwargs = {} if impl == "default" else {impl: True}
    return torch.optim.AdamW(parameter_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                             **kwargs)


# --------------------------------------------------------------------------------------------------
# The variants: each a continuous loop calling ``pause()`` after every optimizer step
# --------------------------------------------------------------------------------------------------

class Variant:
    name = ""

    def __init__(self, data: SharedData, cfg: Config, total_steps: int, cuda: bool, preset: str, tmp: Path) -> None:
        self.data, self.cfg, self.total_steps, self.cuda = data, cfg, total_steps, cuda
        self.preset, self.tmp = preset, tmp

    def run(self, pause: Callable[[], None]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Plain(Variant):
    name = "plain"

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.model = self.data.model().to(self.device)
        self.optimizer = user_adamw(self.model, self.cfg)
        self.scheduler = cosine_schedule(self.optimizer, self.cfg, self.total_steps)
        self.loader, self.sampler = self.data.loader(self.cuda)
        self.bf16 = self.cfg.train.mixed_precision == "bf16"

    def run(self, pause: Callable[[], None]) -> None:
        model, optimizer, max_norm, step = self.model, self.optimizer, self.cfg.optim.max_grad_norm, 0
        model.train()
        for epoch in range(10**6):
            self.sampler.set_epoch(epoch)
            for batch in self.loader:
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    losses, _ = model(batch)
                losses["total_loss"].backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                optimizer.step()
                self.scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                pause()
                if step >= self.total_steps:
                    return


class AccelerateLoop(Variant):
    name = "accelerate"

    def __init__(self, *args) -> None:
        super().__init__(*args)
        from accelerate import Accelerator

        self.accelerator = Accelerator(cpu=not self.cuda, mixed_precision=self.cfg.train.mixed_precision)
        model = self.data.model()
        optimizer = user_adamw(model, self.cfg)
        scheduler = cosine_schedule(optimizer, self.cfg, self.total_steps)
        loader, _ = self.data.loader(self.cuda)
        self.model, self.optimizer, self.loader, self.scheduler = self.accelerator.prepare(
            model, optimizer, loader, scheduler)

    def run(self, pause: Callable[[], None]) -> None:
        acc, model, optimizer, step = self.accelerator, self.model, self.optimizer, 0
        model.train()
        for epoch in range(10**6):
            self.loader.set_epoch(epoch)
            for batch in self.loader:
                losses, _ = model(batch)
                acc.backward(losses["total_loss"])
                acc.clip_grad_norm_(model.parameters(), self.cfg.optim.max_grad_norm)
                optimizer.step()
                self.scheduler.step()
                optimizer.zero_grad()
                step += 1
                pause()
                if step >= self.total_steps:
                    return


class _StepHook:
    """Stands in for the Trainer's (disabled) progress bar, whose ``update(1)`` the Trainer calls once
    per optimizer step: the benchmark's pause point, without touching mmtrain's code."""

    def __init__(self, bar, pause: Callable[[], None]) -> None:
        self.bar, self.pause = bar, pause

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self.pause()

    def __getattr__(self, name: str):
        return getattr(self.bar, name)


class MmtrainTrainer(Variant):
    telemetry = False

    def __init__(self, *args) -> None:
        super().__init__(*args)
        from mmtrain.trainer import Trainer

        self.cfg = bench_config(self.preset, self.tmp / self.name, self.total_steps, self.cfg.train.mixed_precision,
                                telemetry=self.telemetry)
        self.trainer = Trainer(self.cfg)

    def run(self, pause: Callable[[], None]) -> None:
        trainer = self.trainer
        trainer.progress = _StepHook(trainer.progress, pause)
        trainer.state.session_start = time.perf_counter()
        epoch = 0
        while trainer.state.optimizer_step < trainer.total_steps:
            trainer.train_epoch(epoch)
            trainer.state.epoch, trainer.state.batches_in_epoch = epoch + 1, 0  # what fit does, minus validation
            epoch += 1

    def close(self) -> None:
        self.trainer.loggers.close()


class MmtrainOff(MmtrainTrainer):
    name, telemetry = "mmtrain-off", False


class MmtrainFull(MmtrainTrainer):
    name, telemetry = "mmtrain-full", True


class LightningLoop(Variant):
    name = "lightning"

    def __init__(self, *args) -> None:
        super().__init__(*args)
        import lightning as L
        from lightning.pytorch.callbacks import DeviceStatsMonitor
        from lightning.pytorch.loggers import CSVLogger

        cfg, total_steps, owner = self.cfg, self.total_steps, self

        class Module(L.LightningModule):
            def __init__(self, model: torch.nn.Module) -> None:
                super().__init__()
                self.model = model

            def training_step(self, batch, batch_idx):
                losses, _ = self.model(batch)
                self.log("train_loss", losses["total_loss"])
                return losses["total_loss"]

            def configure_optimizers(self):
                optimizer = user_adamw(self.model, cfg)
                return {"optimizer": optimizer,
                        "lr_scheduler": {"scheduler": cosine_schedule(optimizer, cfg, total_steps), "interval": "step"}}

        class Pause(L.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                owner.pause()

        self.pause: Callable[[], None] = lambda: None
        self.module = Module(self.data.model())
        self.loader, _ = self.data.loader(self.cuda)  # Lightning calls the sampler's set_epoch itself
        root = self.tmp / "lightning"
        self.trainer = L.Trainer(
            accelerator="gpu" if self.cuda else "cpu", devices=1,
            precision="bf16-mixed" if cfg.train.mixed_precision == "bf16" else "32-true",
            max_steps=total_steps, max_epochs=-1, gradient_clip_val=cfg.optim.max_grad_norm,
            gradient_clip_algorithm="norm", logger=CSVLogger(root), callbacks=[DeviceStatsMonitor(), Pause()],
            log_every_n_steps=10, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=root)

    def run(self, pause: Callable[[], None]) -> None:
        self.pause = pause
        self.trainer.fit(self.module, train_dataloaders=self.loader)


CLASSES = {c.name: c for c in (Plain, AccelerateLoop, MmtrainOff, MmtrainFull, LightningLoop)}


# --------------------------------------------------------------------------------------------------
# Driving the variants in blocks
# --------------------------------------------------------------------------------------------------

class Stepper:
    """Runs a variant's loop in its own thread, ``steps`` optimizer steps at a time."""

    def __init__(self, variant: Variant) -> None:
        self.variant = variant
        self.go, self.done = threading.Semaphore(0), threading.Semaphore(0)
        self.budget, self.error, self.finished = 0, None, False
        self.thread = threading.Thread(target=self._main, name=variant.name, daemon=True)
        self.thread.start()

    def _pause(self) -> None:
        self.budget -= 1
        if self.budget <= 0:
            self.done.release()
            self.go.acquire()

    def _main(self) -> None:
        self.go.acquire()
        try:
            self.variant.run(self._pause)
        except BaseException as e:  # handed to the driving thread
            self.error = e
        self.finished = True
        self.done.release()

    def block(self, steps: int) -> None:
        self.budget = steps
        self.go.release()
        self.done.acquire()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        if not self.finished:
            self.budget = 10**9
            self.go.release()  # lets the loop run to its end (at most the remaining steps)
        self.thread.join()
        self.variant.close()


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed_block(stepper: Stepper, steps: int, cuda: bool) -> tuple[float, float, float]:
    """(seconds per step, peak memory MB during the block, that peak above the block's start)."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_mem = torch.cuda.memory_allocated() / 2**20
    else:
        reset_peak()
        start_mem = rss_mb()
    t = time.perf_counter()
    stepper.block(steps)
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb()
    return dt, peak, peak - start_mem


def build_variant(name: str, preset: str, tmp: Path, total_steps: int, precision: str, cuda: bool,
                  data: SharedData | None = None) -> tuple[Variant, SharedData]:
    cfg = bench_config(preset, tmp / "shared", total_steps, precision)
    data = data or SharedData(cfg, cuda)
    return CLASSES[name](data, cfg, total_steps, cuda, preset, tmp), data


def check_same_batches(variants: dict[str, Variant]) -> None:
    """The first batch of epoch 1 is the same for the hand-written loader and mmtrain's."""
    trainers = [v.trainer for v in variants.values() if isinstance(v, MmtrainTrainer)]
    plain = next((v for v in variants.values() if isinstance(v, Plain | AccelerateLoop)), None)
    if not trainers or plain is None:
        return
    loader, sampler = plain.data.loader(False)
    sampler.set_epoch(1)
    ours = next(iter(loader))["input_ids"]
    trainer_loader = trainers[0].train_loader
    trainer_loader.set_epoch(1)
    theirs = next(iter(trainer_loader))["input_ids"].cpu()
    if not torch.equal(ours, theirs):
        raise SystemExit("bench_train: the hand-written loader and mmtrain's draw different batches")


def measure(preset: str, names: list[str], rounds: int, steps: int, precision: str, cuda: bool) -> list[dict]:
    total = (rounds + 1) * steps
    with tempfile.TemporaryDirectory(prefix=f"mmtrain-bench-train-{preset}-") as tmp:
        os.environ.update(WANDB_MODE="offline", WANDB_DIR=tmp, WANDB_SILENT="true")
        variants, data = {}, None
        for name in names:
            variants[name], data = build_variant(name, preset, Path(tmp), total, precision, cuda, data)
        check_same_batches(variants)
        steppers = {name: Stepper(v) for name, v in variants.items()}
        results = {name: {"dt": [], "peak": [], "delta": []} for name in names}
        try:
            for r in range(rounds + 1):
                for name in names if r % 2 == 0 else names[::-1]:
                    dt, peak, delta = timed_block(steppers[name], steps, cuda)
                    if r == 0:
                        continue  # warm-up
                    results[name]["dt"].append(dt)
                    results[name]["peak"].append(peak)
                    results[name]["delta"].append(delta)
        finally:
            for stepper in steppers.values():
                stepper.close()
    bs = data.cfg.train.batch_size
    rows = []
    for name in names:
        dts = results[name]["dt"]
        q = statistics.quantiles(dts, n=4) if len(dts) > 1 else [dts[0], dts[0], dts[0]]
        rows.append({"preset": preset, "variant": name, "samples_s": statistics.median(bs / d for d in dts),
                     "ms": 1000 * statistics.median(dts), "iqr": (1000 * q[0], 1000 * q[2]),
                     "peak": max(results[name]["peak"]), "delta": statistics.median(results[name]["delta"])})
    return rows


# --------------------------------------------------------------------------------------------------
# Whole runs: one process per run
# --------------------------------------------------------------------------------------------------

def child(preset: str, name: str, steps: int, precision: str, cuda: bool) -> int:
    """Build ``name``, train ``steps`` steps, close; print the in-process time of the steps as JSON."""
    with tempfile.TemporaryDirectory(prefix=f"mmtrain-bench-train-{preset}-{name}-") as tmp:
        os.environ.update(WANDB_MODE="offline", WANDB_DIR=tmp, WANDB_SILENT="true")
        variant, _ = build_variant(name, preset, Path(tmp), steps, precision, cuda)
        t = time.perf_counter()
        variant.run(lambda: None)
        if cuda:
            torch.cuda.synchronize()
        loop = time.perf_counter() - t
        variant.close()
    print(json.dumps({"loop_s": loop, "peak_mb": peak_rss_mb()}))
    return 0


def run_child(preset: str, name: str, steps: int, precision: str, cuda: bool) -> tuple[float, float, float]:
    """(wall seconds of the whole process, its own peak RSS in MB, in-process seconds of the steps)."""
    cmd = [sys.executable, __file__, "--child", name, "--presets", preset, "--child-steps", str(steps),
           "--precision", precision, "--user-adamw", USER_ADAMW["impl"], "--user-data", USER_DATA["pipeline"],
           *(["--gpu"] if cuda else [])]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        proc.wait()
        wall = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"bench_train: {' '.join(cmd)} failed:\n{err.read()[-3000:]}")
        result = json.loads(out.read().strip().splitlines()[-1])
    return wall, result["peak_mb"], result["loop_s"]


def measure_whole(preset: str, names: list[str], n1: int, n2: int, repeats: int, precision: str,
                  cuda: bool) -> list[dict]:
    bs = load_config(REPO / "configs" / f"{preset}.yaml").train.batch_size
    marginal: dict[str, list[float]] = {n: [] for n in names}
    loop_marginal: dict[str, list[float]] = {n: [] for n in names}
    peak: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            w1, _, l1 = run_child(preset, name, n1, precision, cuda)
            w2, p2, l2 = run_child(preset, name, n2, precision, cuda)
            marginal[name].append((w2 - w1) / (n2 - n1))
            loop_marginal[name].append((l2 - l1) / (n2 - n1))
            peak[name].append(p2)
            print(f"  {preset} repeat {r + 1}/{repeats} {name:<13} T({n1})={w1:6.1f}s T({n2})={w2:6.1f}s "
                  f"marginal {1000 * marginal[name][-1]:7.1f} ms/step, peak RSS {p2:7.0f} MB", flush=True)
    rows = []
    for name in names:
        ms = 1000 * statistics.median(marginal[name])
        spread = (1000 * min(marginal[name]), 1000 * max(marginal[name]))
        rows.append({"preset": preset, "variant": name, "samples_s": 1000 * bs / ms, "ms": ms, "iqr": spread,
                     "peak": statistics.median(peak[name]), "delta": float("nan"),
                     "loop_ms": 1000 * statistics.median(loop_marginal[name])})
    return rows


# --------------------------------------------------------------------------------------------------

def table(rows: list[dict], whole: bool) -> list[str]:
    spread = "min-max ms" if whole else "IQR ms"
    mem = "peak RSS MB (child)" if whole else "peak RSS MB (+step)"
    lines = [f"| preset | variant | samples/s | ms/step | {spread} | {mem} | samples/s vs plain | "
             "ms/step vs plain | peak vs plain |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    base = {r["preset"]: r for r in rows if r["variant"] == "plain"}
    for r in rows:
        b = base.get(r["preset"])
        ratios = ("—", "—", "—") if b is None else (f"{r['samples_s'] / b['samples_s']:.3f}",
                                                    f"{r['ms'] / b['ms']:.3f}", f"{r['peak'] / b['peak']:.3f}")
        memory = f"{r['peak']:.0f}" if whole or math.isnan(r["delta"]) else f"{r['peak']:.0f} (+{r['delta']:.0f})"
        lines.append(f"| {r['preset']} | {r['variant']} | {r['samples_s']:.1f} | {r['ms']:.1f} | "
                     f"{r['iqr'][0]:.1f}-{r['iqr'][1]:.1f} | {memory} | {' | '.join(ratios)} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=None, help="configs/<preset>.yaml (default: tiny laptop; "
                                                                    "with --gpu: default)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds after the warm-up one "
                                                                 "(default: 40 tiny, 15 otherwise)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per block (10 = one log window)")
    parser.add_argument("--gpu", action="store_true", help="run on CUDA in bf16 (default preset)")
    parser.add_argument("--precision", default=None, choices=["no", "bf16"],
                        help="default: no (fp32) on CPU, bf16 with --gpu")
    parser.add_argument("--user-adamw", default="default", choices=["default", "foreach", "fused"],
                        help="AdamW implementation of plain, accelerate and lightning (mmtrain: fused)")
    parser.add_argument("--user-data", default="on-the-fly", choices=["on-the-fly", "decoded"],
                        help="samples of plain, accelerate and lightning: decoded every epoch (what a user writes) "
                             "or read from mmtrain's decode cache (mmtrain: its defaults)")
    parser.add_argument("--whole-runs", action="store_true", help="one process per run: marginal per-step cost")
    parser.add_argument("--n1", type=int, default=30, help="--whole-runs: the short run's steps")
    parser.add_argument("--n2", type=int, default=130, help="--whole-runs: the long run's steps")
    parser.add_argument("--repeats", type=int, default=3, help="--whole-runs: interleaved repeats")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--child-steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    cuda = args.gpu
    USER_ADAMW["impl"] = args.user_adamw
    USER_DATA["pipeline"] = args.user_data
    if cuda and not torch.cuda.is_available():
        print("bench_train: --gpu asked for, but CUDA is not available here: GPU figures skipped.")
        return 0
    precision = args.precision or ("bf16" if cuda else "no")
    presets = args.presets or (["default"] if cuda else ["tiny", "laptop"])
    if args.child:
        return child(presets[0], args.child, args.child_steps, precision, cuda)

    names = list(args.variants)
    if "lightning" in names and not lightning_available():
        print("bench_train: lightning is not installed (pip install -e .[bench]): the lightning variant is skipped.")
        names.remove("lightning")
    import accelerate

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # its start-up banner
    warnings.filterwarnings("ignore", module="lightning")
    versions = f"torch {torch.__version__}, accelerate {accelerate.__version__}"
    if "lightning" in names:
        import lightning

        versions += f", lightning {lightning.__version__}"
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} torch threads"
    print(f"{versions}; {device}; precision {precision}; variants {' '.join(names)}; "
          f"plain/accelerate/lightning: AdamW {args.user_adamw}, data {args.user_data}", flush=True)

    rows = []
    for preset in presets:
        if args.whole_runs:
            print(f"{preset}: whole runs, T({args.n2}) - T({args.n1}), {args.repeats} repeats", flush=True)
            rows += measure_whole(preset, names, args.n1, args.n2, args.repeats, precision, cuda)
        else:
            rounds = args.rounds or (40 if preset == "tiny" else 15)
            print(f"{preset}: {rounds} rounds x {args.steps} steps per variant, interleaved", flush=True)
            rows += measure(preset, names, rounds, args.steps, precision, cuda)
    print()
    print("\n".join(table(rows, args.whole_runs)))
    if args.whole_runs:
        print("\nin-process loop time, same runs (ms/step, marginal): " +
              ", ".join(f"{r['preset']}/{r['variant']} {r['loop_ms']:.1f}" for r in rows))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
