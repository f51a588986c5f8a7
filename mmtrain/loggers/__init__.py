"""Pluggable logging sinks behind one small interface (:class:`BaseLogger`), held by :class:`Loggers`.

``build_loggers`` makes the run's sinks: on the main rank ``jsonl`` (metrics.jsonl, always, first)
and then the ones named in ``log.loggers``, in that order; on the other ranks none, so the training
loop never branches on rank to log. Each sink module is imported only when it is chosen, so
importing this package never imports wandb, tensorboard or torch.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mmtrain.errors import ConfigError
from mmtrain.loggers.base import BaseLogger, Image, Loggers, Table

if TYPE_CHECKING:
    from mmtrain.config import WandbConfig

__all__ = ["LOGGER_NAMES", "BaseLogger", "Image", "Loggers", "Table", "build_loggers"]

LOGGER_NAMES = ("wandb", "tensorboard", "csv")  # what log.loggers may name; jsonl is always on


def build_loggers(is_main: bool, output_dir: Path, names: Sequence[str], wandb_cfg: "WandbConfig",
                  epoch_metrics: Sequence[str]) -> Loggers:
    """The run's sinks, not started yet (``Loggers.open`` starts them). ConfigError for a name not in
    :data:`LOGGER_NAMES`, on every rank, so that a typo stops all of them alike."""
    for name in names:
        if name not in LOGGER_NAMES:
            raise ConfigError(f"log.loggers must name loggers among {', '.join(LOGGER_NAMES)} (got {name!r}); "
                              "metrics.jsonl is always written")
    if len(set(names)) != len(names):
        raise ConfigError(f"log.loggers must name each logger once (got {list(names)!r})")
    if not is_main:
        return Loggers([])
    from mmtrain.loggers.jsonl import JsonlLogger

    sinks: list[BaseLogger] = [JsonlLogger(output_dir)]
    for name in names:
        if name == "wandb":
            from mmtrain.loggers.wandb_logger import WandbLogger

            sinks.append(WandbLogger(output_dir, wandb_cfg, epoch_metrics))
        elif name == "tensorboard":
            from mmtrain.loggers.tensorboard_logger import TensorBoardLogger

            sinks.append(TensorBoardLogger(output_dir))
        else:
            from mmtrain.loggers.csv_logger import CsvLogger

            sinks.append(CsvLogger(output_dir))
    return Loggers(sinks)
