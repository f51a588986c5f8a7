"""Everything about processes and devices in one place: building the Accelerator, main-process I/O.

World size and DDP/FSDP choices come from the launcher (``accelerate launch`` YAMLs, torchrun,
SLURM); this module only makes sure the same code forms one process group wherever it starts.
"""

import os
import sys
import warnings

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import DistributedDataParallelKwargs

from mmtrain.config import TrainConfig

_LAUNCHED_VARS = ("WORLD_SIZE", "LOCAL_RANK", "RANK")


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


def launched_by_a_launcher() -> bool:
    return any(v in os.environ for v in _LAUNCHED_VARS)


def print_main(accelerator: Accelerator, *lines: str) -> None:
    if accelerator.is_main_process:
        for line in lines:
            print(line, file=sys.stdout, flush=True)
