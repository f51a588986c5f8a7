"""AdamW with decoupled weight decay, and a warmup + cosine schedule sized in optimizer steps."""

import math

import torch
from torch import nn
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from mmtrain.config import OptimConfig
from mmtrain.errors import ConfigError


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and conv kernels only: biases, norm gains, embeddings, position tables and
    the temperature are not weights whose magnitude should be pulled to zero."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_table = "embedding" in name or name.endswith(("position", "logit_scale"))
        (no_decay if p.ndim < 2 or is_table else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """The fused kernel is one launch for all parameters, and it is the implementation that accepts
    ``found_inf``: the non-finite guard skips a step with it on device, without a host sync."""
    return torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)


def optimizer_steps(batches_per_epoch: int, accumulation: int, epochs: int, max_steps: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps).

    ``batches_per_epoch`` is what one rank iterates (after sharding), so the count is right for any
    number of processes. Accelerate closes the accumulation window at the end of each epoch, so a
    partial window is one more optimizer step, not carried into the next epoch.
    """
    per_epoch = math.ceil(batches_per_epoch / accumulation)
    total = per_epoch * epochs
    return per_epoch, min(total, max_steps) if max_steps else total


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then a half cosine down to ``min_lr``.

    Optimizer step k (1-based) runs with the schedule's value at index k-1, so the schedule is
    sized to ``total_steps - 1``: the last optimizer step runs at exactly ``min_lr``, and with no
    warmup the first runs at exactly ``lr``.
    """
    if cfg.warmup_steps and cfg.warmup_steps >= total_steps - 1:
        # Warmup must leave at least one step of decay, or the last step would run at the peak lr.
        raise ConfigError(f"optim.warmup_steps={cfg.warmup_steps} must be smaller than the {total_steps} "
                          f"optimizer steps of this run minus one, so that the schedule can decay to optim.min_lr "
                          "(lower it, or raise train.epochs / train.max_steps)")
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps - 1,
        min_lr_rate=cfg.min_lr / cfg.lr,
    )
