"""Speed levers of the training step, each behind a ``train.*`` field (README "Speed options"):

- ``train.compile``: ``torch.compile`` through Accelerate's own mechanism, a ``TorchDynamoPlugin`` given
  to the ``Accelerator`` (:func:`dynamo_plugin`); ``prepare`` compiles the model last, after DDP/FSDP.
  The trainer's checkpoint and export paths hold the plain module, so state-dict keys never gain
  ``_orig_mod.``.
- ``train.channels_last``: conv weights and the image batch in NHWC (:func:`apply_channels_last`), without
  touching the model's code or Accelerate: a forward pre-hook converts ``pixel_values`` on the way in.
- cuDNN autotuning (:func:`enable_cudnn_benchmark`): every batch is ``image_size x image_size``, so the
  fastest convolution algorithm found for the first batch stays the fastest; CUDA only.
- ``train.reuse_host_memory``: glibc's allocator keeps freed memory for the next step
  (:func:`reuse_host_memory`). PyTorch has no caching allocator for CPU tensors: every activation and
  gradient is a ``malloc``/``free``, and glibc's defaults return large blocks to the OS, so the next step
  faults the same pages in again.

The measured effect of each is in benchmarks/BENCHMARKS.md ("Speed levers", ``benchmarks/bench_levers.py``).
"""

import ctypes
import shutil
import sys
from typing import Any

import torch
from accelerate.utils import TorchDynamoPlugin
from torch import nn

# train.compile values that mean "do not compile"; "false" is what a YAML/CLI `false` becomes.
EAGER = ("none", "false")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def compile_mode(value: str) -> str | None:
    """The torch.compile mode ``train.compile`` asks for, or None for eager (``none`` / ``false``)."""
    return None if value in EAGER else value


def dynamo_plugin(value: str) -> TorchDynamoPlugin | None:
    """The Accelerator's ``dynamo_plugin`` for ``train.compile``: inductor with the requested mode, or
    None for eager, which leaves Accelerate's own default in place (its ``ACCELERATE_DYNAMO_*``
    variables, i.e. an ``accelerate launch`` config's ``dynamo_config``, still apply then).

    Raises ConfigError when compiling on CPU without a C++ compiler (inductor's CPU code is C++): the
    run would otherwise fail at its first step, after the data was loaded."""
    mode = compile_mode(value)
    if mode is None:
        return None
    from mmtrain.errors import ConfigError

    if not torch.cuda.is_available() and shutil.which("g++") is None and shutil.which("c++") is None:
        raise ConfigError(f"train.compile {value} needs a C++ compiler on CPU (inductor builds C++ kernels) and "
                          "none was found; install g++ (apt-get install g++) or pass --train.compile none")
    # fullgraph off: the model's few graph breaks (the optional all-gather of global alignment) are
    # allowed; dynamic left to torch (a different last batch size recompiles once, then is dynamic).
    return TorchDynamoPlugin(backend="inductor", mode=mode)


def use_channels_last(value: str, device: torch.device, mixed_precision: str, sharded: bool) -> bool:
    """Whether ``train.channels_last`` (auto / true / false) turns NHWC on for this run.

    auto: on for CUDA with bf16/fp16 autocast, where cuDNN's tensor-core convolutions are NHWC-native
    (PyTorch's channels_last tutorial; mmtrain's GPU figure is pending), off under FSDP (sharding a
    channels_last parameter is not exercised) and off on CPU, where benchmarks/bench_levers.py measured
    no gain on the laptop preset (ratio 0.99-1.01, within the noise; benchmarks/BENCHMARKS.md, "Speed levers")."""
    if value != "auto":
        return value == "true"
    return device.type == "cuda" and mixed_precision in ("bf16", "fp16") and not sharded


def _channels_last_inputs(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Forward pre-hook: the batch dict's 4-d ``pixel_values`` in channels_last (a new dict: the
    caller's batch is left as it was)."""
    if args and isinstance(args[0], dict):
        pixels = args[0].get("pixel_values")
        if isinstance(pixels, torch.Tensor) and pixels.dim() == 4:
            return ({**args[0], "pixel_values": pixels.contiguous(memory_format=torch.channels_last)}, *args[1:])
    return None


def apply_channels_last(model: nn.Module, value: str, device: torch.device, mixed_precision: str,
                        sharded: bool = False) -> bool:
    """Put ``model``'s 4-d parameters (conv weights) in channels_last and convert every batch's
    ``pixel_values`` (B, C, H, W) on the way into ``model.forward``, when :func:`use_channels_last`
    says so; in place, before ``accelerator.prepare`` (the optimizer's state is created lazily, in
    the same layout). Tensor values and shapes are unchanged, only strides. Returns whether it did."""
    if not use_channels_last(value, device, mixed_precision, sharded):
        return False
    model.to(memory_format=torch.channels_last)
    model.register_forward_pre_hook(_channels_last_inputs)
    return True


def enable_cudnn_benchmark(device: torch.device) -> bool:
    """Let cuDNN time its convolution algorithms on the first batch and keep the fastest (fixed image
    size, so once per shape: the training batch, a smaller last batch, evaluation). CUDA only; on any
    other device the global flag is left as it was. Returns whether it was set."""
    if device.type != "cuda":
        return False
    torch.backends.cudnn.benchmark = True
    return True


# glibc's mallopt parameters (malloc.h) and the largest mmap threshold it accepts on 64-bit
# (DEFAULT_MMAP_THRESHOLD_MAX: 4 * 1024 * 1024 * sizeof(long)).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 << 20
TRIM_THRESHOLD = 1 << 30


def reuse_host_memory(enabled: bool) -> bool:
    """Make glibc's malloc keep freed memory for reuse, process-wide; returns whether it did.

    glibc serves blocks above its mmap threshold (128 KiB at start, raised dynamically up to 32 MiB)
    with fresh ``mmap`` calls and trims the heap top above its trim threshold. A training step frees
    its activations and gradients (PyTorch has no CPU caching allocator), so with the defaults each step
    maps and faults in the same memory again: ~4,200 minor page faults and ~12.5 ms of kernel time per
    laptop step on the 2-core CPU, against ~20 and ~0.5 ms with the mmap threshold at its 32 MiB maximum
    and a 1 GiB trim threshold (benchmarks/BENCHMARKS.md, "Allocation churn"). It is PyTorch's CPU
    tuning guide's advice (reuse memory: jemalloc, tcmalloc) with the allocator already loaded.
    The cost: the process keeps its peak heap instead of shrinking after it. Linux with glibc only
    (``gnu_get_libc_version`` present); elsewhere, or with ``enabled`` False, nothing changes."""
    if not enabled or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - musl has mallopt as a stub, and no gnu_get_libc_version
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
