"""Images and caption samples of a fixed set of validation images, for the main process to log.

The set is fixed at start-up so that successive grids and tables show the same engravings and
changes between them are the model's, not the sample's. Only the main process builds a
``MediaLogger``; the others hold a ``NullMediaLogger``, so the loop never branches on rank.
"""

from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.utils import make_grid
from transformers import PreTrainedTokenizerBase

from mmtrain.tracking import Image, NullTracker, Table


def reconstruction_grid(images: Tensor, reconstruction: Tensor) -> np.ndarray:
    """Three rows — originals, reconstructions, |difference| — as an (H, W, 3) uint8 array."""
    diff = (reconstruction.float() - images.float()).abs()
    rows = torch.cat([images.float(), reconstruction.float(), diff]).clamp(0, 1).cpu()
    if rows.shape[1] == 1:
        rows = rows.expand(-1, 3, -1, -1)
    grid = make_grid(rows, nrow=images.shape[0], padding=2, pad_value=1.0)
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def to_uint8(image: Tensor) -> np.ndarray:
    """(C, H, W) float in [0, 1] -> (H, W, C) uint8 (gray stays single-channel)."""
    arr = (image.float().clamp(0, 1).cpu().permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return arr[..., 0] if arr.shape[-1] == 1 else arr


class NullMediaLogger:
    def reconstructions(self, step: int) -> None:
        pass

    def captions(self, step: int) -> None:
        pass


class MediaLogger(NullMediaLogger):
    """Logs the reconstruction grid and the caption table of ``batch`` through ``tracker``."""

    def __init__(self, model: nn.Module, batch: dict[str, Tensor], tokenizer: PreTrainedTokenizerBase,
                 tracker: NullTracker,
                 autocast: Callable[[], AbstractContextManager]) -> None:
        self.model, self.batch, self.tokenizer, self.tracker, self.autocast = model, batch, tokenizer, tracker, autocast

    @torch.no_grad()
    def _run(self, fn: Callable[[], object]) -> object:
        was_training = self.model.training
        self.model.eval()
        try:
            with self.autocast():
                return fn()
        finally:
            self.model.train(was_training)

    def reconstructions(self, step: int) -> None:
        images = self.batch["pixel_values"]
        recon = self._run(lambda: self.model.image_decoder(self.model.image_encoder(images)))
        self.tracker.log({"media/reconstructions": Image(reconstruction_grid(images, recon),
                                                         caption="rows: original, reconstruction, |difference|")},
                         step=step)

    def captions(self, step: int) -> None:
        images = self.batch["pixel_values"]
        tok = self.tokenizer
        ids = self._run(lambda: self.model.generate(images, tok.bos_token_id, tok.eos_token_id))
        generated = tok.batch_decode(ids, skip_special_tokens=True)
        truth = tok.batch_decode(self.batch["input_ids"], skip_special_tokens=True)
        rows = [[Image(to_uint8(img)), gt, gen] for img, gt, gen in zip(images, truth, generated, strict=True)]
        self.tracker.log({"media/captions": Table(["image", "ground_truth", "generated"], rows)}, step=step)
