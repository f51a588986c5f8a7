"""Data pipeline speed: the training DataLoader alone against what the training step consumes.

    python benchmarks/bench_data.py                  # laptop preset on CPU (~8 min on 2 busy cores)
    python benchmarks/bench_data.py --trainer-workers 0 1 --rounds 12
    python benchmarks/bench_data.py --tables trainer --rounds 14      # only the Trainer A/B (decode cache)
    python benchmarks/bench_data.py --preset tiny --train-size 64 --val-size 16 --rounds 1 --batches 2 --steps 2

Four tables, markdown, on stdout:

1. **The dataset.** Generating the preset's synthetic engravings into a fresh cache folder (a temporary
   one, so the user's cache is not touched), then loading it again (the cached reload every later run
   does); and building the decode cache (``data.decode_cache``: every image decoded once into Arrow by a
   ``datasets.map``) and loading it again (a fingerprint hit). One timing each: they happen once per run.
2. **Loader alone vs the step.** Samples/s of the training DataLoader exactly as ``mmtrain.data`` builds it
   (``build_dataloader``: shuffled, ``num_workers`` 0/1/2, persistent workers, pinned memory on CUDA),
   iterated with no model, decoding on the fly or reading the decode cache; against the samples/s the
   training step consumes: the preset's model, forward + backward + clip + mmtrain's AdamW on batches
   already in memory (no loading at all). The loader ratio is loader / step: the issue's target is >= 3 on
   the laptop preset on CPU. A loader block is one pass over a fixed subset of ``--batches`` batches, so
   no worker is left decoding ahead while another arm is timed; the arms run in rounds, one block each,
   the order reversed every round; round 0 is warm-up. Ratios are medians of per-round ratios.
3. **Reading the decode cache**: a batch of rows by index, decoded on the fly, from the cache through the
   numpy format (what the loader uses) and through the torch format (row by row: why it is not used).
4. **The training step rate** (whole ``Trainer.train_epoch``, telemetry on, W&B disabled), decode cache
   off vs on, for each ``--trainer-workers``: the arms are Trainers running their own continuous loop in a
   thread that pauses every ``--steps`` optimizer steps (``bench_train``'s ``Stepper``), interleaved the
   same way. The ratio is to the first arm (on the fly, the first worker count). Also the process's CPU
   time per step (``time.process_time``): the work a step does, which other jobs on a shared machine
   disturb less than wall time (a worker's decoding runs in its own process and is not in it).
   ``--tables trainer`` runs only this one (after the dataset timings), ``--tables loader`` only 2 and 3.

Figures move with the machine's load; compare ratios taken in the same run.
"""

import argparse
import contextlib
import itertools
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_train import MmtrainTrainer, Stepper  # noqa: E402

from mmtrain.config import Config, load_config  # noqa: E402
from mmtrain.data import build_dataloader, load_splits, make_transform, undecoded  # noqa: E402
from mmtrain.decoded import DecodedSamples, decode_once  # noqa: E402
from mmtrain.model import build_model  # noqa: E402
from mmtrain.optim import build_optimizer  # noqa: E402
from mmtrain.synthetic import synthetic_dataset  # noqa: E402
from mmtrain.tokenizer import build_tokenizer  # noqa: E402


def bench_config(args: argparse.Namespace, cache_dir: Path, **overrides) -> Config:
    """The preset at the benchmark's dataset size, cached in ``cache_dir``, with ``overrides``."""
    sizes = {"data.synthetic_train_size": args.train_size, "data.synthetic_val_size": args.val_size}
    return load_config(REPO / "configs" / f"{args.preset}.yaml",
                       {**{k: v for k, v in sizes.items() if v}, "data.cache_dir": str(cache_dir), **overrides})


def timed(fn):
    t = time.perf_counter()
    result = fn()
    return time.perf_counter() - t, result


def dataset_times(cfg: Config) -> tuple[list[str], object, object]:
    """Table 1 rows, and the train split and its decode cache for the other tables."""
    d, m = cfg.data, cfg.model

    def generate():
        return synthetic_dataset(d.synthetic_train_size, d.synthetic_val_size, m.image_size, d.synthetic_seed,
                                 d.resolved_cache_dir())

    t_gen, _ = timed(generate)
    t_reload, _ = timed(generate)
    train = load_splits(d, m).train
    t_decode, decoded = timed(lambda: decode_once(train, m, "train"))
    t_decode_reload, decoded = timed(lambda: decode_once(train, m, "train"))
    n = d.synthetic_train_size + d.synthetic_val_size
    rows = [
        "| what | seconds | per 1000 images |",
        "|---|---:|---:|",
        f"| generate the synthetic set ({n} images, {m.image_size} px), fresh cache folder | {t_gen:.2f} | "
        f"{1000 * t_gen / n:.2f} |",
        f"| reload it from the cache (second load) | {t_reload:.3f} | {1000 * t_reload / n:.3f} |",
        f"| build the decode cache of the train split ({len(train)} images) | {t_decode:.2f} | "
        f"{1000 * t_decode / len(train):.2f} |",
        f"| reload the decode cache (fingerprint hit) | {t_decode_reload:.3f} | "
        f"{1000 * t_decode_reload / len(train):.3f} |",
    ]
    return rows, train, decoded


class LoaderArm:
    """One loader configuration: a block is one pass over ``batches`` batches of a fixed subset."""

    def __init__(self, name: str, loader) -> None:
        self.name, self.loader = name, loader

    def block(self) -> int:
        samples = 0
        for batch in self.loader:
            samples += batch["pixel_values"].shape[0]
        return samples


class StepArm:
    """The training step alone: forward, backward, clip, optimizer, on batches already in memory."""

    name = "step (fwd+bwd+opt, no loading)"

    def __init__(self, cfg: Config, tokenizer, batches: list[dict], steps: int) -> None:
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model, len(tokenizer)).train()
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.max_norm, self.batches, self.steps = cfg.optim.max_grad_norm, itertools.cycle(batches), steps

    def block(self) -> int:
        samples = 0
        for _ in range(self.steps):
            batch = next(self.batches)
            losses, _ = self.model(batch)
            losses["total_loss"].backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            samples += batch["pixel_values"].shape[0]
        return samples


def interleave(arms: list, rounds: int) -> dict[str, list[float]]:
    """Samples/s per arm per timed round: one block per arm per round, order reversed every round."""
    rates: dict[str, list[float]] = {arm.name: [] for arm in arms}
    for r in range(rounds + 1):
        for arm in arms if r % 2 == 0 else arms[::-1]:
            dt, samples = timed(arm.block)
            if r:  # round 0 is warm-up: workers start, caches fill
                rates[arm.name].append(samples / dt)
    return rates


def loader_table(cfg: Config, args: argparse.Namespace, train, decoded, cuda: bool) -> list[str]:
    bs = cfg.train.batch_size
    rows = min(len(train), args.batches * bs)
    subset, subset_decoded = train.select(range(rows)), decoded.select(range(rows))
    tokenizer = build_tokenizer(train["caption"], cfg.model.max_caption_length, cfg.data.min_word_frequency)
    arms: list = []
    for workers, cache in itertools.product(args.workers, (False, True)):
        for pin in (False, True) if cuda else (False,):
            loader = build_dataloader(subset, tokenizer, cfg.model, bs, workers, shuffle=True, seed=cfg.train.seed,
                                      pin_memory=pin, decoded=subset_decoded if cache else None)
            name = f"loader: {workers} worker(s), {'decode cache' if cache else 'decode on the fly'}" + \
                (", pinned" if pin else "")
            arms.append(LoaderArm(name, loader))
    in_memory = list(build_dataloader(subset, tokenizer, cfg.model, bs, 0, shuffle=False, seed=0))
    step = StepArm(cfg, tokenizer, in_memory, args.steps)
    rates = interleave([step, *arms], args.rounds)
    lines = ["| arm | samples/s (median) | min-max | loader / step (median of per-round ratios) |",
             "|---|---:|---:|---:|"]
    for arm in [step, *arms]:
        r = rates[arm.name]
        ratio = statistics.median(a / s for a, s in zip(r, rates[step.name], strict=True))
        lines.append(f"| {arm.name} | {statistics.median(r):.0f} | {min(r):.0f}-{max(r):.0f} | "
                     f"{'—' if arm is step else f'{ratio:.2f}'} |")
    return lines


class FetchArm:
    """Fetching one batch of rows by index (what the loader asks its dataset for), ``batches`` per block."""

    def __init__(self, name: str, fetch, n: int, batch_size: int, batches: int) -> None:
        self.name, self.fetch = name, fetch
        g = torch.Generator().manual_seed(0)
        self.index = [torch.randperm(n, generator=g)[:batch_size].tolist() for _ in range(batches)]

    def block(self) -> int:
        for ix in self.index:
            self.fetch(ix)
        return sum(len(ix) for ix in self.index)


def format_table(cfg: Config, args: argparse.Namespace, train, decoded) -> list[str]:
    """Why the decode cache is read through the numpy format: a batch of rows by each way."""
    tokenizer = build_tokenizer(train["caption"], cfg.model.max_caption_length, cfg.data.min_word_frequency)
    fly = undecoded(train).with_transform(make_transform(tokenizer, cfg.model))
    cached = DecodedSamples(decoded, tokenizer, cfg.model)
    as_torch = decoded.with_format("torch")
    bs, n = cfg.train.batch_size, len(train)
    arms = [FetchArm("decode on the fly (make_transform)", fly.__getitems__, n, bs, args.batches),
            FetchArm("decode cache, numpy format (DecodedSamples, as trained)", cached.__getitems__, n, bs,
                     args.batches),
            FetchArm("decode cache, torch format (pixels only)", lambda ix: as_torch[ix]["pixel_values"], n, bs,
                     args.batches)]
    rates = interleave(arms, args.rounds)
    lines = ["| a batch of rows by index | ms per batch (median) | vs decoding on the fly |", "|---|---:|---:|"]
    for arm in arms:
        ratio = statistics.median(a / b for a, b in zip(rates[arm.name], rates[arms[0].name], strict=True))
        lines.append(f"| {arm.name} | {1000 * bs / statistics.median(rates[arm.name]):.2f} | {ratio:.2f}x |")
    return lines


class TrainerArm(MmtrainTrainer):
    """bench_train's Trainer variant (its continuous ``train_epoch`` loop and step pause) on our config."""

    def __init__(self, name: str, cfg: Config, total_steps: int) -> None:
        from mmtrain.trainer import Trainer

        self.name, self.cfg, self.total_steps, self.cuda = name, cfg, total_steps, False
        self.trainer = Trainer(cfg)


def trainer_table(args: argparse.Namespace, cache_dir: Path, tmp: Path) -> list[str]:
    total = (args.rounds + 1) * args.steps + 1
    arms = []
    for workers, cache in itertools.product(args.trainer_workers, ("false", "true")):
        name = f"Trainer: {workers} worker(s), {'decode cache' if cache == 'true' else 'decode on the fly'}"
        cfg = bench_config(args, cache_dir, **{
            "data.num_workers": workers, "data.decode_cache": cache, "train.output_dir": str(tmp / name),
            "train.overwrite": True, "train.progress_bar": False, "train.max_steps": total, "train.epochs": 10**6,
            "checkpoint.every_steps": 0, "checkpoint.every_minutes": 0.0, "wandb.mode": "disabled",
            "wandb.media_samples": 0})
        arms.append(TrainerArm(name, cfg, total))
    steppers = {arm.name: Stepper(arm) for arm in arms}
    rates: dict[str, list[float]] = {arm.name: [] for arm in arms}
    cpu: dict[str, list[float]] = {arm.name: [] for arm in arms}
    bs = arms[0].cfg.train.batch_size
    try:
        for r in range(args.rounds + 1):
            for arm in arms if r % 2 == 0 else arms[::-1]:
                start = time.process_time()
                dt, _ = timed(lambda arm=arm: steppers[arm.name].block(args.steps))
                if r:
                    rates[arm.name].append(bs * args.steps / dt)
                    cpu[arm.name].append(1000 * (time.process_time() - start) / args.steps)
    finally:
        for stepper in steppers.values():
            stepper.close()
    base, base_cpu = rates[arms[0].name], cpu[arms[0].name]
    # CPU time of this process per step: the work the step does, less sensitive than wall time to other
    # jobs on the machine; a worker's decoding is in its own process and not counted.
    lines = [f"| arm | samples/s (median) | min-max | vs {arms[0].name} (median of per-round ratios) | "
             "process CPU ms/step (median) | CPU vs first arm |", "|---|---:|---:|---:|---:|---:|"]
    for arm in arms:
        r, c = rates[arm.name], cpu[arm.name]
        ratio = statistics.median(a / b for a, b in zip(r, base, strict=True))
        cpu_ratio = statistics.median(a / b for a, b in zip(c, base_cpu, strict=True))
        lines.append(f"| {arm.name} | {statistics.median(r):.1f} | {min(r):.1f}-{max(r):.1f} | {ratio:.3f} | "
                     f"{statistics.median(c):.0f} | {cpu_ratio:.3f} |")
    return lines


def run(argv: list[str] | None = None) -> str:
    """Run the benchmark as the command line ``argv`` says; returns the markdown report (also printed)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="laptop", help="configs/<preset>.yaml (default laptop)")
    parser.add_argument("--train-size", type=int, default=0, help="synthetic training images (0: the preset's)")
    parser.add_argument("--val-size", type=int, default=0, help="synthetic validation images (0: the preset's)")
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds after the warm-up round")
    parser.add_argument("--batches", type=int, default=40, help="batches per loader block")
    parser.add_argument("--steps", type=int, default=10, help="training steps per step / Trainer block")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker counts")
    parser.add_argument("--trainer-workers", type=int, nargs="*", default=[0],
                        help="worker counts of the Trainer arms (none: skip the Trainer table)")
    parser.add_argument("--tables", nargs="+", default=["loader", "trainer"], choices=["loader", "trainer"],
                        help="which measurements after the dataset's (default both)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    import accelerate
    import datasets

    datasets.disable_progress_bars()
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} torch threads"
    out = [f"bench_data: preset {args.preset}; {device}; {len(os.sched_getaffinity(0))} usable cores; "
           f"torch {torch.__version__}, accelerate {accelerate.__version__}, datasets {datasets.__version__}; "
           f"{args.rounds} rounds, {args.batches} batches per loader block, {args.steps} steps per step block", ""]
    with tempfile.TemporaryDirectory(prefix="mmtrain-bench-data-") as tmp:
        os.environ.setdefault("WANDB_SILENT", "true")
        cache_dir = Path(tmp) / "cache"
        cfg = bench_config(args, cache_dir)
        rows, train, decoded = dataset_times(cfg)
        out += ["### The dataset (one timing each)", "", *rows, ""]
        if "loader" in args.tables:
            out += ["### Loader alone vs the training step", "", *loader_table(cfg, args, train, decoded, cuda), ""]
            out += ["### Reading the decode cache", "", *format_table(cfg, args, train, decoded), ""]
        if args.trainer_workers and "trainer" in args.tables:
            out += ["### Training step rate: decode cache off vs on", "",
                    *trainer_table(args, cache_dir, Path(tmp) / "runs"), ""]
    report = "\n".join(out)
    print(report, flush=True)
    return report


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    with contextlib.suppress(KeyboardInterrupt):
        run()
