"""The model and optimizer tensors of a checkpoint: how they are written and read back.

Separate from :mod:`mmtrain.checkpoint` (which owns the policy, the folder and the commit protocol)
because their layout depends on how the model is distributed: under DDP every rank holds the same
full tensors and the main rank alone writes them. Both functions are collective: every rank calls
them at the same point, inside the checkpoint's temporary folder, before the commit.
"""

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from mmtrain.errors import CheckpointError

MODEL_FILE, OPTIMIZER_FILE = "model.safetensors", "optimizer.pt"


def save_weights(accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, folder: Path) -> None:
    """Collective. Write ``model`` (unwrapped) and ``optimizer`` into ``folder``: the main rank
    writes ``model.safetensors`` and ``optimizer.pt`` (identical on every rank after DDP's
    all-reduce)."""
    if accelerator.is_main_process:
        save_model(model, str(folder / MODEL_FILE))  # de-duplicates the tied embedding
        torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)


def load_weights(accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, folder: Path,
                 device: torch.device) -> None:
    """Collective. Load what :func:`save_weights` wrote in ``folder`` into ``model`` and
    ``optimizer``, on ``device``; every rank reads the files itself (no broadcast of large
    tensors). Raises CheckpointError naming the file when it is missing, damaged or does not fit."""
    from mmtrain.checkpoint import safe_load  # the one safe torch.load, kept beside the other checkpoint files

    path = folder / MODEL_FILE
    try:
        missing, unexpected = load_model(model, str(path), strict=False, device=str(device))
    except (OSError, RuntimeError, ValueError, SafetensorError) as e:
        raise CheckpointError(f"{path} cannot be loaded ({e}); resume from another checkpoint") from None
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit this model (missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]})")
    optimizer.load_state_dict(safe_load(folder / OPTIMIZER_FILE, device))
