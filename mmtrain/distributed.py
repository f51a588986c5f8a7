"""Everything about processes and devices in one place: building the Accelerator, main-process I/O.

World size and DDP/FSDP choices come from the launcher (``accelerate launch`` YAMLs, torchrun,
SLURM); this module only makes sure the same code forms one process group wherever it starts.
"""

import sys
import warnings
from collections.abc import Mapping, Sequence

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import DistributedDataParallelKwargs
from torch import Tensor
from tqdm.auto import tqdm

from mmtrain.config import TrainConfig


def resolve_precision(requested: str, use_cpu: bool) -> str:
    """The mixed precision actually used. fp16 has no CPU kernels worth using: say so, run bf16."""
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


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    """One Accelerator for any launcher.

    On a machine without CUDA, Accelerate treats ``accelerate launch --multi_gpu`` and ``torchrun``
    workers as N independent single-process runs unless it is told ``cpu=True``; with it they join
    one gloo group. So CPU is chosen here whenever CUDA is absent (or ``train.cpu`` asks for it).
    """
    use_cpu = cfg.cpu or not torch.cuda.is_available()
    return Accelerator(
        cpu=use_cpu,
        mixed_precision=resolve_precision(cfg.mixed_precision, use_cpu),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        # A seedable sampler makes the shuffle order a function of (seed, epoch): exact mid-epoch
        # resume and identical order for any number of processes depend on it.
        # non_blocking: batches come from pinned memory on GPU, so the host->device copy overlaps
        # compute instead of synchronising every step.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed,
                                                  non_blocking=not use_cpu),
        # Scheduler is stepped by the trainer once per optimizer step, not once per process.
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )


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
