"""The validation pass: exact values over the whole validation split, for any number of processes.

Built on the model's own per-sample terms and the one reduction of :func:`mmtrain.model.reduce_terms`
(the loss weighting lives there and nowhere else): every rank runs its shard, per-sample rows are
gathered with ``gather_for_metrics`` (which drops the samples padded in to even out the last
batch), and the sums over the split are reduced exactly as a training batch is.

The alignment term is the exception: InfoNCE contrasts a sample with the others of its batch,
so it is recomputed after the gather on consecutive groups of ``group_size`` samples in split
order (:func:`mmtrain.model.eval_alignment`): the value depends neither on how evaluation was
batched or sharded nor on padding duplicates, which would otherwise enter as negatives. The
trainer sets ``group_size`` to the batch a training sample was contrasted with: the per-device
batch, times the number of processes under ``model.global_alignment``.
"""

import math

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import DataLoader

from mmtrain.distributed import gather_named
from mmtrain.metrics import MAX_FIELDS, SUM_FIELDS, retrieval_recall, sample_stats, summarize
from mmtrain.model import eval_alignment, loss_terms, reduce_terms


class Evaluator:
    """Runs the validation pass; :attr:`running` tells an OOM handler the pass was under way."""

    def __init__(self, accelerator: Accelerator, group_size: int) -> None:
        self.accelerator = accelerator
        self.group_size = group_size  # the batch training contrasts with: as many negatives as in training
        self.running = False

    @torch.no_grad()
    def run(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """Collective (every rank): ``{"val/<metric>": value}`` over the whole split behind ``loader``.

        Loss components and ``total_loss`` as in training, the sample metrics of the README glossary
        (latent, image, caption), and image<->caption retrieval recall over the split.
        """
        acc = self.accelerator
        model.eval()
        self.running = True
        device = acc.device
        # The alignment term is recomputed after the gather; every other term is summed as it comes.
        summed = [t for t in loss_terms() if t != "alignment"]
        term_sums = {t: torch.zeros((), dtype=torch.float64, device=device) for t in summed}
        sums = torch.zeros(len(SUM_FIELDS), dtype=torch.float64, device=device)
        maxes = torch.full((len(MAX_FIELDS),), -math.inf, dtype=torch.float64, device=device)
        latents, texts, ids = [], [], []
        for batch in loader:
            _, out = model(batch)
            # From the forward, not the parameter: under FSDP a rank holds only a shard of it outside forward.
            scale = out["scale"]
            s, m = sample_stats(batch["pixel_values"], out["reconstruction"], out["latent"], out["logits"],
                                batch["input_ids"], batch["attention_mask"])
            terms, s, m, lat, txt, cap = acc.gather_for_metrics(
                ({t: out[t] for t in summed}, s, m, out["latent"], out["text_embedding"], batch["input_ids"]))
            for t in summed:
                term_sums[t] += terms[t].double().sum()
            sums += s.sum(dim=0)
            maxes = torch.maximum(maxes, m.amax(dim=0))
            latents.append(lat)
            texts.append(txt)
            ids.append(cap)
        model.train()
        self.running = False
        latent, text = torch.cat(latents), torch.cat(texts)
        term_sums["alignment"] = eval_alignment(latent, text, scale, self.group_size).double().sum()
        count = torch.tensor(float(latent.shape[0]), dtype=torch.float64, device=device)
        losses = reduce_terms(acc.unwrap_model(model).config, term_sums, count)
        recall: dict[str, Tensor] = retrieval_recall(latent, text, torch.cat(ids))
        host = gather_named(None, {"loss": losses, "sums": (SUM_FIELDS, sums), "maxes": (MAX_FIELDS, maxes),
                                   "recall": recall})[0]
        val = {**host["loss"], **summarize(host["sums"], host["maxes"]), **host["recall"]}
        return {f"val/{k}": v for k, v in val.items()}
