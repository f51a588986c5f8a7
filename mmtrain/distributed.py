"""Everything about processes and devices in one place: building the Accelerator, main-process I/O.

World size and DDP/FSDP choices come from the launcher (``accelerate launch`` YAMLs, torchrun,
SLURM); this module only makes sure the same code forms one process group wherever it starts, and
holds the few helpers whose behaviour depends on whether parameters are sharded (FSDP2) or
replicated (DDP): :func:`is_sharded`, :func:`local_grads`, :func:`full_state_dict`, :func:`full_model`.
"""

import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import PartialState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, FullyShardedDataParallelPlugin
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from mmtrain.config import TrainConfig
from mmtrain.errors import ConfigError
from mmtrain.speed import dynamo_plugin, enable_cudnn_benchmark


def resolve_precision(requested: str, use_cpu: bool) -> str:
    """The mixed precision actually used. ``auto`` is the launcher's choice: ``accelerate launch``
    exports its ``--mixed_precision`` (or the config file's) as ACCELERATE_MIXED_PRECISION, and an
    Accelerator given an explicit value would override it; without a launcher, ``no``. fp16 has no
    CPU kernels worth using: say so, run bf16."""
    if requested == "auto":
        requested = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
        if requested not in ("no", "fp16", "bf16"):  # fp8 and others: not a precision mmtrain trains in
            raise ConfigError(f"the launcher asks for mixed precision {requested!r} (ACCELERATE_MIXED_PRECISION), "
                              "which mmtrain does not support; pass --train.mixed_precision no, bf16 or fp16")
    if requested == "fp16" and use_cpu:
        warnings.warn(
            "train.mixed_precision=fp16 was requested but training runs on CPU, where fp16 autocast is "
            "not supported; running in bf16 instead. Set --train.mixed_precision bf16 (or no) to silence this.",
            stacklevel=2,
        )
        return "bf16"
    if requested == "bf16" and not use_cpu and not torch.cuda.is_bf16_supported():
        warnings.warn("train.mixed_precision=bf16 is not supported by this GPU; running in fp16 instead.",
                      stacklevel=2)
        return "fp16"
    return requested


def fsdp_requested() -> bool:
    """Did the launcher ask for FSDP? ``accelerate launch --config_file accelerate_configs/fsdp.yaml``
    sets ``ACCELERATE_USE_FSDP=true`` and the ``FSDP_*`` variables the plugin reads; under torchrun
    the same variables can be exported by hand."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def scalars_as_vectors(model: nn.Module) -> list[str]:
    """Give every 0-d parameter the shape (1,), in place (the same Parameter objects, so an optimizer
    built before keeps them), and return their names. FSDP2 refuses scalar parameters ("fully_shard
    doesn't support scalar parameters"), and the model has one (``alignment.logit_scale``); a
    (1,) parameter broadcasts exactly as the scalar did wherever the model uses it. State dicts of
    such a model hold (1,) tensors: :func:`full_model` and the checkpoint loaders reshape by element
    count when they meet the other form."""
    names = []
    for name, p in model.named_parameters():
        if p.dim() == 0:
            p.data = p.data.reshape(1)
            names.append(name)
    return names


class _Fsdp2Plugin(FullyShardedDataParallelPlugin):
    """accelerate's plugin (configured from the launcher's FSDP_* variables), plus the one model
    change FSDP2 needs, made where accelerate hands the model over: ``set_auto_wrap_policy`` is the
    first thing ``fsdp2_prepare_model`` calls, before ``fully_shard``."""

    def set_auto_wrap_policy(self, model: nn.Module) -> None:
        scalars_as_vectors(model)
        super().set_auto_wrap_policy(model)


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    """One Accelerator for any launcher.

    On a machine without CUDA, Accelerate treats ``accelerate launch --multi_gpu`` and ``torchrun``
    workers as N independent single-process runs unless it is told ``cpu=True``; with it they join
    one gloo group. So CPU is chosen here whenever CUDA is absent (or ``train.cpu`` asks for it).

    DDP gets ``train.ddp_find_unused_parameters`` and ``train.ddp_bucket_cap_mb``; FSDP (FSDP2 only)
    is configured by the launcher's ``fsdp_config`` and also runs on CPU over gloo. Raises
    ConfigError for an FSDP1 config.
    """
    use_cpu = cfg.cpu or not torch.cuda.is_available()
    precision = resolve_precision(cfg.mixed_precision, use_cpu)
    plugin = _Fsdp2Plugin() if fsdp_requested() else None  # reads the FSDP_* variables
    if plugin is not None and plugin.fsdp_version != 2:
        raise ConfigError(f"fsdp_config.fsdp_version is {plugin.fsdp_version}: mmtrain supports FSDP2 only; set "
                          "fsdp_version: 2 in the accelerate config (see accelerate_configs/fsdp.yaml)")
    if plugin is not None and precision != "no" and plugin.mixed_precision_policy is None:
        # Left to accelerate, the policy would reduce-scatter gradients in bf16/fp16 as well; summing
        # N ranks' shards in 8 mantissa bits loses the small gradients. Compute in low precision,
        # reduce in fp32 (torchtitan's default, mixed_precision_reduce = float32).
        from torch.distributed.fsdp import MixedPrecisionPolicy

        low = torch.bfloat16 if precision == "bf16" else torch.float16
        plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.ddp_find_unused_parameters,
                                        bucket_cap_mb=cfg.ddp_bucket_cap_mb)
    acc = Accelerator(
        cpu=use_cpu,
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        # A seedable sampler makes the shuffle order a function of (seed, epoch): exact mid-epoch
        # resume and identical order for any number of processes depend on it.
        # non_blocking: batches come from pinned memory on GPU, so the host->device copy overlaps
        # compute instead of synchronising every step.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed,
                                                  non_blocking=not use_cpu),
        # Scheduler is stepped by the trainer once per optimizer step, not once per process.
        step_scheduler_with_optimizer=False,
        fsdp_plugin=plugin,
        kwargs_handlers=[] if plugin is not None else [ddp],  # DDP's settings only where DDP wraps
        dynamo_plugin=dynamo_plugin(cfg.compile),  # train.compile; prepare() compiles last, after DDP/FSDP
    )
    enable_cudnn_benchmark(acc.device)  # fixed image size: the autotuned conv algorithm stays the best
    if plugin is not None and acc.distributed_type == DistributedType.MULTI_CPU:
        _fsdp_on_cpu(acc, plugin, precision)
    return acc


def _fsdp_on_cpu(acc: Accelerator, plugin: FullyShardedDataParallelPlugin, precision: str) -> None:
    """Turn a multi-process CPU (gloo) Accelerator into an FSDP one.

    accelerate 1.16 selects DistributedType.FSDP only inside the GPU-type branch of
    ``AcceleratorState.__init__`` (accelerate/state.py: ``elif self.distributed_type in
    [DistributedType.MULTI_GPU, ...]`` -> ``if ACCELERATE_USE_FSDP ... or fsdp_plugin is not None:
    self.distributed_type = DistributedType.FSDP``), so with ``cpu=True`` it stays MULTI_CPU and would
    DDP-wrap. torch's FSDP2 itself runs on CPU over gloo; setting the three fields that branch sets
    makes accelerate's FSDP2 prepare, clipping and state dicts run (tests/test_fsdp.py checks the
    result against DDP). The rest of the CPU state (device, gloo group, ranks) is what FSDP on CPU
    needs; on a GPU machine accelerate selects FSDP itself and this is not called.
    """
    if precision != "no":
        plugin.set_mixed_precision(precision)
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def is_sharded(accelerator: Accelerator | None) -> bool:
    """Are the parameters, gradients and optimizer state sharded across ranks (FSDP)? False for
    DDP and single-process runs, where every rank holds the full tensors."""
    return accelerator is not None and accelerator.distributed_type == DistributedType.FSDP


def local_grads(params: Sequence[nn.Parameter]) -> list[Tensor]:
    """This rank's part of each gradient: the local shard of an FSDP2 (DTensor) gradient, the
    gradient itself otherwise; empty shards (a tensor smaller than the world) are left out."""
    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None]
    return [g for g in grads if g.numel() > 0]


def full_state_dict(accelerator: Accelerator, model: nn.Module) -> dict[str, Tensor]:
    """Collective under FSDP: the model's full (unsharded) state dict, on the CPU, on the main rank
    (an empty dict on the others). Under DDP or one process: the unwrapped model's own state dict,
    on every rank, without communication."""
    if not is_sharded(accelerator):
        return accelerator.unwrap_model(model, keep_torch_compile=False).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_model(accelerator: Accelerator, model: nn.Module, build: Callable[[], nn.Module]) -> nn.Module | None:
    """Collective under FSDP: a plain, unsharded copy of ``model`` on the main rank (None on the
    others), built with ``build()`` and loaded from the gathered full state dict. Under DDP or one
    process: ``unwrap_model(model)`` itself, without a copy."""
    if not is_sharded(accelerator):
        return accelerator.unwrap_model(model, keep_torch_compile=False)
    state = full_state_dict(accelerator, model)
    if not accelerator.is_main_process:
        return None
    plain = build()
    own = plain.state_dict()  # a (1,) tensor of a scalar parameter goes back to its 0-d shape
    plain.load_state_dict({k: v.reshape(own[k].shape) if k in own else v for k, v in state.items()})
    return plain


def progress_bar(accelerator: Accelerator, total: int, initial: int, enabled: bool) -> tqdm:
    """The optimizer-step bar, on the main process only; in a job log (no terminal) it redraws at
    most every 10 s, so the log stays short."""
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                disable=not (accelerator.is_main_process and enabled),
                mininterval=0.1 if sys.stderr.isatty() else 10.0)


def print_main(accelerator: Accelerator, *lines: str) -> None:
    if accelerator.is_main_process:
        for line in lines:
            print(line, file=sys.stdout, flush=True)


# A part of a gathered row: named scalars, or a vector with one name per element.
Part = Mapping[str, Tensor | float] | tuple[Sequence[str], Tensor | Sequence[float]]


def gather_named(accelerator: Accelerator | None, parts: Mapping[str, Part]) -> list[dict[str, dict[str, float]]]:
    """Copy named values to the host in one transfer, all-gathered across ranks when given an
    ``accelerator`` (a collective: call it on every rank). The one place where columns are packed
    into a vector and unpacked again, by name.

    ``parts`` maps a part name to its columns: ``{column: 0-d tensor or float}``, or
    ``(column names, 1-d tensor)``. Returns one ``{part: {column: value}}`` per rank, in rank order
    (a single one without ``accelerator``). Values are float64 on the way, so counts stay exact.
    """
    if accelerator is not None:
        device = accelerator.device
    else:  # where the tensors already are: one device for the concatenation, one copy to the host
        tensors = [v for part in parts.values() for v in (part[1:] if isinstance(part, tuple) else part.values())
                   if isinstance(v, Tensor)]
        device = tensors[0].device if tensors else torch.device("cpu")
    layout, vectors = [], []
    for part, columns in parts.items():
        if isinstance(columns, tuple):
            names, values = columns
            vector = torch.as_tensor(values, dtype=torch.float64).flatten()
        else:
            names = list(columns)
            vector = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device).reshape(())
                                  for v in columns.values()]) if names else torch.zeros(0, dtype=torch.float64)
        if vector.numel() != len(names):
            raise ValueError(f"part {part!r}: {vector.numel()} values for {len(names)} column names")
        layout.append((part, list(names)))
        vectors.append(vector.to(device))
    packed = torch.cat(vectors)[None]
    if accelerator is not None:
        packed = accelerator.gather(packed)
    rows = packed.cpu().tolist()  # the single device->host transfer
    out = []
    for row in rows:
        record, offset = {}, 0
        for part, names in layout:
            record[part] = dict(zip(names, row[offset:offset + len(names)], strict=True))
            offset += len(names)
        out.append(record)
    return out
