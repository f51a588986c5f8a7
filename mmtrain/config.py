"""Typed configuration: one dataclass per concern, defaults < YAML < command line.

Every field carries its meaning in ``metadata["help"]`` so that ``mmtrain train --help`` and the
README can list it. Values are validated in ``__post_init__`` and every error names the field as
``section.field``, because that is what the user typed. How a value's text becomes a field's type
(the same rule from a config file and the command line) is :mod:`mmtrain.config_values`.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mmtrain.config_values import TextLoader, coerce, parse_yaml_file, type_name
from mmtrain.errors import ConfigError


def _f(default: Any, help: str) -> Any:
    """A field with its meaning attached; immutable defaults only (lists use default_factory)."""
    return field(default=default, metadata={"help": help})


def _require(cond: bool, section: str, name: str, why: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{section}.{name} {why} (got {value!r})")


# numpy and torch seed generators take 32-bit unsigned seeds; outside this they fail mid-start-up.
SEED_RANGE = (0, 2**32 - 1)


def _require_seed(section: str, name: str, value: int) -> None:
    _require(SEED_RANGE[0] <= value <= SEED_RANGE[1], section, name, f"must be in [0, {SEED_RANGE[1]}]", value)


def _is_colour(spec: Any) -> bool:
    from PIL import ImageColor  # the parser mmtrain.images uses, so a valid value always decodes

    try:
        ImageColor.getrgb(spec)
    except Exception:  # ValueError for unknown names; TypeError/AttributeError for non-strings
        return False
    return True


@dataclass
class ModelConfig:
    image_size: int = _f(128, "Square image side in pixels; must be divisible by 2**image_encoder_layers.")
    image_channels: int = _f(3, "1 (grayscale) or 3 (RGB); images are converted on load.")
    image_background: str = _f(
        "white", "Colour transparent pixels are composited onto, as a viewer shows them (a PIL colour: white, "
        "#f0f0f0, rgb(0,0,0)); saved with the model, so predict and retrieve use it too.")
    latent_dim: int = _f(1024, "Size of the image latent vector.")
    image_encoder_layers: int = _f(5, "Strided conv blocks in the encoder; each halves the image side.")
    base_channels: int = _f(64, "Channels of the first encoder block; doubled per block up to max_channels.")
    max_channels: int = _f(1024, "Cap on conv channels in encoder and decoder.")
    embedding_dim: int = _f(512, "Width of the caption transformer and its token embeddings.")
    transformer_layers: int = _f(4, "Causal transformer layers in the caption decoder.")
    text_layers: int = _f(
        2,
        "How many of transformer_layers read the caption alone (they produce the text embedding "
        "for alignment); the rest also attend to the latent prefix.",
    )
    attention_heads: int = _f(8, "Attention heads per transformer layer.")
    prefix_tokens: int = _f(4, "Number of prefix tokens the latent is projected to for the caption decoder.")
    max_caption_length: int = _f(
        32, "Caption length in tokens, [BOS] and [EOS] included; longer captions are truncated.")
    dropout: float = _f(0.1, "Dropout in the transformer layers.")
    vocab_size: int = _f(0, "Vocabulary size; 0 means 'from the tokenizer built on the training captions'.")
    image_loss_weight: float = _f(1.0, "Weight of loss_image (MSE reconstruction) in total_loss.")
    caption_loss_weight: float = _f(1.0, "Weight of loss_caption (token cross-entropy) in total_loss.")
    alignment_loss_weight: float = _f(0.5, "Weight of loss_alignment (symmetric InfoNCE) in total_loss.")
    init_temperature: float = _f(0.07, "Initial temperature of the alignment softmax (learned).")
    global_alignment: bool = _f(
        True, "On: in training, each sample's alignment loss contrasts it with the captions/images of every "
        "rank's batch (all-gathered with gradient, like open_clip's gather_features), so a run of N processes "
        "has N x batch_size - 1 negatives; off: only its own rank's batch. No effect with one process.")

    def __post_init__(self) -> None:
        s = "model"
        for name in ("image_size", "latent_dim", "image_encoder_layers", "base_channels", "max_channels",
                     "embedding_dim", "transformer_layers", "attention_heads", "prefix_tokens"):
            _require(getattr(self, name) > 0, s, name, "must be > 0", getattr(self, name))
        _require(self.image_channels in (1, 3), s, "image_channels", "must be 1 or 3", self.image_channels)
        _require(_is_colour(self.image_background), s, "image_background",
                 "must be a colour PIL understands, e.g. white, #f0f0f0 or rgb(240,240,240)", self.image_background)
        _require(self.max_caption_length >= 3, s, "max_caption_length", "must be >= 3 ([BOS] word [EOS])",
                 self.max_caption_length)
        _require(1 <= self.text_layers < self.transformer_layers, s, "text_layers",
                 f"must be in [1, transformer_layers-1] (transformer_layers={self.transformer_layers})",
                 self.text_layers)
        _require(self.embedding_dim % self.attention_heads == 0, s, "embedding_dim",
                 f"must be divisible by attention_heads={self.attention_heads}", self.embedding_dim)
        _require(0.0 <= self.dropout < 1.0, s, "dropout", "must be in [0, 1)", self.dropout)
        _require(self.vocab_size >= 0, s, "vocab_size", "must be >= 0", self.vocab_size)
        _require(self.init_temperature > 0, s, "init_temperature", "must be > 0", self.init_temperature)
        for name in ("image_loss_weight", "caption_loss_weight", "alignment_loss_weight"):
            _require(getattr(self, name) >= 0, s, name, "must be >= 0", getattr(self, name))
        factor = 2**self.image_encoder_layers
        _require(self.image_size % factor == 0, s, "image_size",
                 f"must be divisible by 2**image_encoder_layers = {factor}; use e.g. "
                 f"{max(factor, round(self.image_size / factor) * factor)} or fewer encoder layers",
                 self.image_size)


@dataclass
class DataConfig:
    source: Literal["synthetic", "imagefolder", "disk", "hub"] = _f(
        "synthetic",
        "synthetic: built-in engravings; imagefolder: a folder of images with metadata.jsonl/csv; "
        "disk: a datasets.save_to_disk folder; hub: a Hugging Face Hub dataset name in data.path.",
    )
    path: str | None = _f(None, "Folder (imagefolder, disk) or hub dataset name (hub).")
    image_column: str = _f("image", "Column holding the images.")
    caption_column: str = _f("caption", "Column holding the captions.")
    train_split: str = _f("train", "Split to train on.")
    val_split: str | None = _f(
        None, "Split to validate on; null picks 'validation', 'valid', 'val' or 'test' if present, "
        "else val_fraction of the train split is held out.",
    )
    val_fraction: float = _f(0.1, "Share of the train split held out for validation when there is no val split.")
    split_seed: int = _f(0, "Seed of the held-out split.")
    synthetic_train_size: int = _f(4627, "Number of synthetic training engravings.")
    synthetic_val_size: int = _f(514, "Number of synthetic validation engravings.")
    synthetic_seed: int = _f(0, "Seed of the synthetic engravings; the same seed draws the same images.")
    cache_dir: str | None = _f(
        None, "Where the synthetic dataset is cached; null means $MMTRAIN_CACHE or ~/.cache/mmtrain.")
    # Typed str so that config files and the command line can say "auto"; __post_init__ turns a whole
    # number into an int (coerce's int rule), so an explicit value reaches the DataLoader as before.
    num_workers: str = _f(
        "auto", "DataLoader worker processes per rank (0 = load in the training process), or auto: chosen from the "
        "device and the cores this process may use (os.sched_getaffinity split over the node's processes): on CUDA "
        "min(8, cores per process - 1) workers with pinned memory; on CPU 0 below 8 cores per process (the step "
        "and the workers compete for the same cores), else 1 per 8. The value used is printed at start-up.")
    decode_cache: Literal["auto", "true", "false"] = _f(
        "auto", "Decode every image once into a datasets cache (float32 pixels after the resize and crop, exactly "
        "the tensors decoded on the fly, so training is bit-identical) instead of in every epoch. auto: on when "
        "the decoded train + validation splits take at most 2 GiB (image_channels x image_size^2 x 4 bytes each).")
    min_word_frequency: int = _f(1, "Words seen fewer times in the training captions map to [UNK].")
    skip_bad_samples: bool = _f(False, "Skip unreadable images (counted and reported) instead of stopping.")

    def __post_init__(self) -> None:
        s = "data"
        if self.source in ("imagefolder", "disk", "hub"):
            _require(bool(self.path), s, "path", f"is required when data.source is {self.source!r}; pass "
                     f"--data.path {'NAME' if self.source == 'hub' else 'FOLDER'}", self.path)
        if self.source in ("imagefolder", "disk") and self.path:
            _require(Path(self.path).expanduser().is_dir(), s, "path",
                     "must be an existing folder; check the path or set data.source", self.path)
        _require(self.caption_column != self.image_column, s, "caption_column",
                 f"must differ from data.image_column={self.image_column!r}; set the column holding the captions",
                 self.caption_column)
        _require(self.val_split != self.train_split, s, "val_split",
                 f"must differ from data.train_split={self.train_split!r} (validating on the training data measures "
                 "nothing); name another split, or leave it null to hold out data.val_fraction of the train split",
                 self.val_split)
        _require(0.0 < self.val_fraction < 1.0, s, "val_fraction", "must be in (0, 1)", self.val_fraction)
        _require_seed(s, "split_seed", self.split_seed)
        _require_seed(s, "synthetic_seed", self.synthetic_seed)
        _require(self.synthetic_train_size > 0, s, "synthetic_train_size", "must be > 0", self.synthetic_train_size)
        _require(self.synthetic_val_size > 0, s, "synthetic_val_size", "must be > 0", self.synthetic_val_size)
        given = self.num_workers
        if isinstance(given, str) and given.strip() == "auto":
            self.num_workers = "auto"
        else:
            try:
                workers = coerce(f"{s}.num_workers", given, int)
            except ConfigError:
                workers = -1  # reported below, with what is accepted
            _require(workers >= 0, s, "num_workers", "must be auto or a whole number >= 0 (worker processes per "
                     "rank; 0 loads in the training process)", given)
            self.num_workers = workers  # type: ignore[assignment]
        _require(self.min_word_frequency >= 1, s, "min_word_frequency", "must be >= 1", self.min_word_frequency)

    def resolved_cache_dir(self) -> Path:
        base = self.cache_dir or os.environ.get("MMTRAIN_CACHE") or "~/.cache/mmtrain"
        return Path(base).expanduser()


@dataclass
class OptimConfig:
    lr: float = _f(1e-3, "Peak learning rate of AdamW.")
    min_lr: float = _f(0.0, "Floor of the cosine schedule, reached exactly at the last optimizer step.")
    warmup_steps: int = _f(0, "Optimizer steps of linear warmup from 0 to lr.")
    weight_decay: float = _f(1e-4, "AdamW decoupled weight decay (not applied to biases, norms, embeddings).")
    beta1: float = _f(0.9, "AdamW beta1.")
    beta2: float = _f(0.999, "AdamW beta2.")
    eps: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(1.0, "Clip the global gradient L2 norm to this value; 0 disables clipping.")

    def __post_init__(self) -> None:
        s = "optim"
        _require(self.lr > 0, s, "lr", "must be > 0", self.lr)
        _require(0 <= self.min_lr <= self.lr, s, "min_lr", "must be in [0, optim.lr]", self.min_lr)
        _require(self.warmup_steps >= 0, s, "warmup_steps", "must be >= 0", self.warmup_steps)
        _require(self.weight_decay >= 0, s, "weight_decay", "must be >= 0", self.weight_decay)
        _require(0 <= self.beta1 < 1, s, "beta1", "must be in [0, 1)", self.beta1)
        _require(0 <= self.beta2 < 1, s, "beta2", "must be in [0, 1)", self.beta2)
        _require(self.eps > 0, s, "eps", "must be > 0", self.eps)
        _require(self.max_grad_norm >= 0, s, "max_grad_norm", "must be >= 0", self.max_grad_norm)


@dataclass
class TrainConfig:
    output_dir: str = _f("runs/mmtrain", "Run folder: config.yaml, metrics.jsonl, checkpoints/, model/, wandb/.")
    epochs: int = _f(10, "Passes over the training set.")
    max_steps: int = _f(0, "Stop after this many optimizer steps (0 = no cap); the schedule is sized to it.")
    batch_size: int = _f(16, "Samples per device per micro-batch.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = _f(
        "auto", "Autocast precision; auto: the launcher's (accelerate launch --mixed_precision, or its config "
        "file's mixed_precision, e.g. bf16 in accelerate_configs/fsdp.yaml), else no. fp16 on a CPU-only machine "
        "runs as bf16 with a warning.")
    compile: Literal["none", "false", "default", "reduce-overhead", "max-autotune"] = _f(
        "none", "torch.compile the model (inductor, through Accelerate's TorchDynamoPlugin) in this mode; "
        "none/false: eager. Off by default: on the 2-core CPU a cold compile took 3-5 minutes for a step "
        "~3 percent faster, paid back after ~750 steps even from a warm cache (benchmarks/BENCHMARKS.md, "
        "Summary); GPU figure pending. CPU needs a C++ compiler.")
    channels_last: Literal["auto", "true", "false"] = _f(
        "auto", "Conv weights and images in channels_last (NHWC) memory format. auto: on for CUDA with bf16/fp16 "
        "(cuDNN's tensor-core convolutions are NHWC-native), off on CPU (no gain measured there) and under FSDP.")
    reuse_host_memory: bool = _f(
        True, "glibc (Linux): keep freed host memory for the next step instead of returning it to the OS "
              "(process-wide mallopt; ~4,200 fewer page faults per CPU laptop step). See README, Speed options.")
    seed: int = _f(42, "Seed for model init, data order and dropout on every rank.")
    eval_batch_size: int = _f(0, "Samples per device in evaluation; 0 means train.batch_size.")
    cpu: bool = _f(False, "Train on CPU even if a GPU is present.")
    overwrite: bool = _f(False, "Replace the outputs of an earlier run in output_dir instead of refusing to start.")
    resume: str = _f(
        "none", "auto: continue from the newest complete checkpoint in output_dir/checkpoints (start fresh if "
        "there is none); a checkpoint folder path: continue from it; none: start a new run.")
    requeue: bool = _f(
        True, "Under SLURM, after saving on SIGUSR1, requeue the job (scontrol requeue) so that it continues "
              "with train.resume auto.")
    max_nonfinite_steps: int = _f(
        5, "Stop the run after this many consecutive optimizer steps with a non-finite loss or gradient "
           "(each such step is skipped: weights and optimizer state are left unchanged).")
    progress_bar: bool = _f(True, "Show a tqdm bar on the main process.")
    ddp_find_unused_parameters: bool = _f(
        False, "DDP only: let DDP search for parameters without a gradient each step (needed only if a "
               "change to the model leaves some unused; costs a graph walk per step). FSDP ignores it.")
    ddp_bucket_cap_mb: int = _f(
        25, "DDP only: gradient all-reduce bucket size in MB (torch's default 25); larger buckets mean fewer, "
            "bigger messages, which can help across slow links. FSDP ignores it.")

    def __post_init__(self) -> None:
        s = "train"
        _require(bool(self.output_dir), s, "output_dir", "must not be empty", self.output_dir)
        _require(self.epochs > 0, s, "epochs", "must be > 0", self.epochs)
        _require(self.max_steps >= 0, s, "max_steps", "must be >= 0", self.max_steps)
        _require(self.batch_size > 0, s, "batch_size", "must be > 0", self.batch_size)
        _require(self.gradient_accumulation_steps > 0, s, "gradient_accumulation_steps", "must be > 0",
                 self.gradient_accumulation_steps)
        _require(self.eval_batch_size >= 0, s, "eval_batch_size", "must be >= 0", self.eval_batch_size)
        _require(bool(self.resume), s, "resume", "must be auto, none or a checkpoint folder", self.resume)
        _require(self.max_nonfinite_steps > 0, s, "max_nonfinite_steps", "must be > 0", self.max_nonfinite_steps)
        _require(self.ddp_bucket_cap_mb > 0, s, "ddp_bucket_cap_mb", "must be > 0", self.ddp_bucket_cap_mb)
        _require_seed(s, "seed", self.seed)


@dataclass
class CheckpointConfig:
    every_steps: int = _f(0, "Also save every this many optimizer steps (0 = only at the end of each epoch).")
    every_minutes: float = _f(0.0, "Also save when this many minutes have passed since the last save (0 = off).")
    keep_last: int = _f(3, "Complete checkpoints to keep in output_dir/checkpoints; older ones are deleted.")

    def __post_init__(self) -> None:
        s = "checkpoint"
        _require(self.every_steps >= 0, s, "every_steps", "must be >= 0", self.every_steps)
        _require(self.every_minutes >= 0, s, "every_minutes", "must be >= 0", self.every_minutes)
        _require(self.keep_last >= 1, s, "keep_last", "must be >= 1", self.keep_last)


LOGGERS = ("wandb", "tensorboard", "csv")


@dataclass
class LogConfig:
    loggers: list[str] = field(default_factory=lambda: ["wandb"], metadata={"help": (
        "Where records go besides metrics.jsonl (always written): any of wandb, tensorboard "
        "(output_dir/tensorboard), csv (output_dir/metrics.csv); comma-separated on the command line.")})

    def __post_init__(self) -> None:
        for name in self.loggers:
            _require(name in LOGGERS, "log", "loggers", f"each must be one of {', '.join(LOGGERS)} "
                     "(metrics.jsonl is always written)", self.loggers)
        _require(len(set(self.loggers)) == len(self.loggers), "log", "loggers", "lists a logger twice", self.loggers)


@dataclass
class WandbConfig:
    mode: Literal["auto", "online", "offline", "disabled"] = _f(
        "auto", "auto: $WANDB_MODE if set, else online when W&B credentials exist (WANDB_API_KEY or ~/.netrc), "
        "else offline. An explicit online/offline/disabled wins over $WANDB_MODE.")
    project: str = _f("multimodal-engravings", "W&B project.")
    entity: str | None = _f(None, "W&B entity (team or user); null = your default.")
    name: str | None = _f(None, "Run name; null lets W&B pick one.")
    group: str | None = _f(None, "W&B run group (a sweep's trials share one); null = no group.")
    tags: list[str] = field(default_factory=list, metadata={"help": "Run tags (comma-separated on the command line)."})
    log_frequency: int = _f(10, "Log the training window every this many optimizer steps.")
    telemetry: bool = _f(True, "Per-window latent/image/caption/gradient/hardware metrics; false logs nothing "
                               "per step (validation and the summary remain).")
    system_metrics: Literal["auto", "true", "false"] = _f(
        "auto", "W&B's own system monitor (its System charts: a wandb-core sampler process). auto: on when a GPU is "
        "present, off on CPU-only machines, where it competes with the training threads for the cores (it cost "
        "12-20 percent of a laptop-preset step on 2 cores; benchmarks/BENCHMARKS.md). mmtrain's per-rank hardware "
        "metrics (hw/*) are logged either way.")
    sample_metrics: Literal["log_steps", "every_step"] = _f(
        "log_steps", "Micro-batches the latent/image/caption metrics of a training record pool. log_steps: those of "
        "the log step (the epoch summary adds each epoch's last step); every_step: every sample of the window, "
        "exactly (about 0.8 percent of a CPU laptop step; README, Metric glossary).")
    image_log_frequency: int = _f(100, "Log the reconstruction grid every this many optimizer steps (0 = never).")
    media_samples: int = _f(8, "Validation images in the reconstruction grid and the caption table (0 = no media).")
    init_timeout: float = _f(30.0, "Seconds to wait for wandb.init before falling back to offline.")

    def __post_init__(self) -> None:
        _require(self.log_frequency > 0, "wandb", "log_frequency", "must be > 0", self.log_frequency)
        _require(self.init_timeout > 0, "wandb", "init_timeout", "must be > 0", self.init_timeout)
        _require(self.image_log_frequency >= 0, "wandb", "image_log_frequency", "must be >= 0",
                 self.image_log_frequency)
        _require(self.media_samples >= 0, "wandb", "media_samples", "must be >= 0", self.media_samples)


@dataclass
class DiagnosticsConfig:
    """Thresholds of the guide's rules of thumb (mmtrain.diagnostics); the README's Diagnostics table
    explains each rule. Counts are in logged records (one per wandb.log_frequency optimizer steps)
    or in epochs, as the name says."""

    enabled: bool = _f(True, "Check the rules during training (main process) and list findings in summary.json.")
    alerts: bool = _f(True, "Also send each finding as a W&B alert (run.alert).")
    alert_wait_minutes: float = _f(5.0, "W&B alerts with the same title are sent at most once per this many minutes.")
    min_logs: int = _f(5, "Logged records a rule needs before it judges a trend (spikes, medians, shares).")
    window: int = _f(20, "Records in the rolling median that spikes are measured against.")
    explosion_factor: float = _f(10.0, "Gradient explosion: grad_norm or grad_max above this times its rolling "
                                       "median over the previous `window` records, or total_loss above this times "
                                       "its lowest earlier value.")
    vanishing_grad_norm: float = _f(1e-7, "Vanishing gradients: grad_norm below this ...")
    vanishing_logs: int = _f(5, "... for this many records in a row.")
    overfit_epochs: int = _f(3, "Overfitting: the val - train loss gap (or val_train_loss_ratio) rose in each "
                                "of this many epochs in a row and val is above train.")
    latent_collapse_std: float = _f(1e-3, "Latent collapse: latent_std below this.")
    latent_blowup_factor: float = _f(100.0, "Latent blow-up: latent_std above this times its first logged value.")
    latent_mean_ratio: float = _f(1.0, "Latent drift: |latent_mean| above this times latent_std ...")
    latent_mean_logs: int = _f(5, "... for this many records in a row (latent_mean should hover around 0).")
    lr_tolerance: float = _f(0.01, "LR schedule: logged learning_rate off the configured warmup + cosine by more "
                                   "than this fraction of optim.lr.")
    caption_epochs: int = _f(3, "Caption stagnation: val caption_accuracy not above, or val caption_perplexity "
                                "not below, its best of earlier epochs for this many epochs.")
    dominance_share: float = _f(0.9, "Loss dominance: one weighted loss component is at least this share of "
                                     "total_loss ...")
    dominance_logs: int = _f(5, "... for this many records in a row.")
    gpu_memory_high: float = _f(90.0, "GPU memory: peak device memory above this percent of the device ...")
    gpu_memory_low: float = _f(30.0, "... or below this percent for min_logs records in a row.")
    data_wait_share: float = _f(0.10, "Input-bound: median data_wait_fraction of the slowest rank over the "
                                      "last `window` records above this ...")
    host_cpu_busy: float = _f(90.0, "... while a GPU is in use or the host's median system_cpu_percent is below this "
                                    "(with every core busy, more loader workers cannot help).")
    straggler_ratio: float = _f(1.2, "Straggler: median over the last `window` records of the slowest rank's "
                                     "step time / the mean of all ranks above this.")

    def __post_init__(self) -> None:
        s = "diagnostics"
        for name in ("min_logs", "window", "vanishing_logs", "overfit_epochs", "latent_mean_logs", "caption_epochs",
                     "dominance_logs"):
            _require(getattr(self, name) >= 1, s, name, "must be >= 1", getattr(self, name))
        for name in ("explosion_factor", "latent_blowup_factor", "straggler_ratio"):
            _require(getattr(self, name) > 1, s, name, "must be > 1", getattr(self, name))
        for name in ("vanishing_grad_norm", "latent_collapse_std", "latent_mean_ratio", "lr_tolerance"):
            _require(getattr(self, name) > 0, s, name, "must be > 0", getattr(self, name))
        _require(self.alert_wait_minutes >= 0, s, "alert_wait_minutes", "must be >= 0", self.alert_wait_minutes)
        _require(0 < self.dominance_share <= 1, s, "dominance_share", "must be in (0, 1]", self.dominance_share)
        _require(0 < self.data_wait_share < 1, s, "data_wait_share", "must be in (0, 1)", self.data_wait_share)
        _require(0 < self.host_cpu_busy <= 100, s, "host_cpu_busy", "must be in (0, 100]", self.host_cpu_busy)
        _require(0 <= self.gpu_memory_low < self.gpu_memory_high <= 100, s, "gpu_memory_low",
                 "and gpu_memory_high must satisfy 0 <= low < high <= 100",
                 (self.gpu_memory_low, self.gpu_memory_high))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def dump(self, path: str | Path) -> None:
        """Write the resolved config as YAML; ``--config`` on that file reproduces this run."""
        Path(path).write_text(self.to_yaml())


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig,
    "checkpoint": CheckpointConfig, "log": LogConfig, "wandb": WandbConfig,
    "diagnostics": DiagnosticsConfig}


def iter_fields() -> typing.Iterator[tuple[str, dataclasses.Field, Any]]:
    """Yield (``section.field``, the field, its resolved type) for every config field."""
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            yield f"{section}.{f.name}", f, hints[f.name]


def field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a config file for build_config, plain scalars kept as text (see coerce); a syntax error is
    reported with its line and column."""
    return parse_yaml_file(path, TextLoader, SECTIONS)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML file that mmtrain wrote itself, with YAML's own types: a run's saved config.yaml, which
    is compared with ``Config.to_dict()``. ``Config.to_yaml`` quotes every string that YAML would otherwise
    type, so this reads back exactly the values saved. A user's config file goes through read_config_file."""
    return parse_yaml_file(path, yaml.SafeLoader, SECTIONS)


def build_config(yaml_values: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
                 source: str = "config") -> Config:
    """Merge defaults < ``yaml_values`` (nested) < ``overrides`` (``{"section.field": value}``).

    Values are coerced by the same rules whatever their source (see coerce): text from read_config_file or
    the command line, or Python values.
    """
    types_by_key = {key: tp for key, _, tp in iter_fields()}
    flat: dict[str, Any] = {}
    for section, values in (yaml_values or {}).items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section {section!r}; expected one of {', '.join(SECTIONS)}")
        if values is None or values == "":  # `model:` with nothing under it ("" as read_config_file reads it)
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping of fields")
        for name, value in values.items():
            flat[f"{section}.{name}"] = value
    flat.update(overrides or {})
    per_section: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, value in flat.items():
        if key not in types_by_key:
            raise ConfigError(f"{source}: unknown field {key!r}; run 'mmtrain train --help' for the list")
        section, name = key.split(".", 1)
        per_section[section][name] = coerce(key, value, types_by_key[key])
    return Config(**{s: SECTIONS[s](**kw) for s, kw in per_section.items()})


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the config file at ``path`` (if any), then ``overrides`` (e.g. command-line text)."""
    return build_config(read_config_file(path) if path else {}, overrides, source=str(path or "config"))


def help_lines() -> list[tuple[str, str, str]]:
    """(``--section.field``, type, 'meaning (default: x)') for every field, for help and docs."""
    rows = []
    for key, f, tp in iter_fields():
        rows.append((f"--{key}", type_name(tp), f"{f.metadata['help']} (default: {field_default(f)!r})"))
    return rows
