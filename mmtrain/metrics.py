"""Metric definitions as pure functions. No ``.item()``, no logging, no distributed calls.

The per-sample functions return rows of *sums* (and of *maxima*) so that any set of samples —
a micro-batch, a logging window across ranks, the whole validation split — is summarised by
adding rows (taking maxima) first and dividing once at the end with :func:`summarize`. That is
what makes a window's ``latent_std`` the std of all the window's latent values, not a mean of
per-batch stds, and what lets evaluation drop the duplicated tail samples exactly.
"""

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Columns of the per-sample sum rows.
SUM_FIELDS = (
    "samples",           # 1 per sample
    "latent_sum",        # sum of latent values
    "latent_sq_sum",     # sum of squared latent values
    "latent_elems",      # number of latent values
    "latent_norm_sum",   # L2 norm of the sample's latent vector
    "image_sq_err",      # sum over pixels of (reconstruction - image)^2
    "image_abs_err",     # sum over pixels of |reconstruction - image|
    "image_pixels",      # number of pixel values (C x H x W)
    "caption_ce",        # sum over predicted tokens of the next-token cross-entropy (nats)
    "caption_correct",   # predicted tokens whose argmax equals the target
    "caption_entropy",   # sum over predicted tokens of the predictive entropy (nats)
    "caption_tokens",    # predicted (non-pad target) tokens
)
# Columns of the per-sample max rows (a minimum is kept as the max of its negation).
MAX_FIELDS = ("latent_max", "latent_neg_min", "image_abs_err_max")


def sample_stats(images: Tensor, reconstruction: Tensor, latent: Tensor, logits: Tensor, input_ids: Tensor,
                 attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample rows ``(sums (B, len(SUM_FIELDS)), maxes (B, len(MAX_FIELDS)))`` in float64.

    Caption terms cover predicted positions: position t predicts token t+1, counted when token
    t+1 is not padding (the same positions ``loss_caption`` uses).
    """
    # Few, batched ops: this runs on every micro-batch, where on small models per-op dispatch
    # (not arithmetic) is the cost. Per-sample sums are float32 (a float64 upcast of the whole
    # image tensor would cost more than the rest together); rows are float64 from here on, so
    # windows and eval sets add up without loss.
    lat = latent.detach().float()
    err = (reconstruction.detach().float() - images.detach().float()).flatten(1)
    abs_err = err.abs()
    log_p = F.log_softmax(logits.detach()[:, :-1].float(), dim=-1)
    targets = input_ids[:, 1:]
    caption = torch.stack([
        -log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1),      # cross-entropy
        (log_p.argmax(dim=-1) == targets).float(),                  # correct
        -(log_p.exp() * log_p).sum(dim=-1),                         # entropy
        torch.ones_like(targets, dtype=torch.float32),              # token count
    ], dim=-1) * attention_mask[:, 1:, None]
    lat_sq = (lat * lat).sum(dim=1)
    sums = torch.cat([
        torch.stack([torch.ones_like(lat_sq), lat.sum(dim=1), lat_sq, torch.full_like(lat_sq, lat.shape[1]),
                     lat_sq.sqrt(), (err * err).sum(dim=1), abs_err.sum(dim=1),
                     torch.full_like(lat_sq, err.shape[1])], dim=1),
        caption.sum(dim=1),
    ], dim=1).double()
    maxes = torch.stack([lat.amax(dim=1), (-lat).amax(dim=1), abs_err.amax(dim=1)], dim=1).double()
    return sums, maxes


def summarize(sums: dict[str, float], maxes: dict[str, float]) -> dict[str, float]:
    """Turn summed rows into the logged metrics (definitions in the README glossary)."""
    n, elems, pixels, tokens = (max(sums[k], 1.0) for k in ("samples", "latent_elems", "image_pixels",
                                                              "caption_tokens"))
    mean = sums["latent_sum"] / elems
    return {
        "latent_mean": mean,
        "latent_std": math.sqrt(max(sums["latent_sq_sum"] / elems - mean * mean, 0.0)),
        "latent_min": -maxes["latent_neg_min"],
        "latent_max": maxes["latent_max"],
        "latent_norm": sums["latent_norm_sum"] / n,
        "image_mse": sums["image_sq_err"] / pixels,
        "image_l1": sums["image_abs_err"] / n,
        "image_diff": sums["image_abs_err"] / pixels,
        "image_diff_max": maxes["image_abs_err_max"],
        "caption_accuracy": sums["caption_correct"] / tokens,
        "caption_perplexity": math.exp(min(sums["caption_ce"] / tokens, 700.0)),
        "caption_entropy": sums["caption_entropy"] / tokens,
    }


# Columns of the gradient row (one optimizer step).
GRAD_FIELDS = ("grad_abs_sum", "grad_sum", "grad_sq_sum", "grad_abs_max", "grad_elems")


def grad_stats(grads_by_module: dict[str, list[Tensor]]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``({GRAD_FIELDS name: 0-d tensor}, {module: squared L2 norm})`` of the given gradients, float64.

    Per-tensor L2 norms come from ``torch._foreach_norm`` (the kernel behind ``clip_grad_norm_``) and
    the absolute values from one ``torch._foreach_abs``: fused calls per module where they exist.
    """
    flat = [g for gs in grads_by_module.values() for g in gs]
    # Every tensor is created on the gradients' device: a host->device copy would be a sync.
    f64 = {"dtype": torch.float64, "device": flat[0].device if flat else torch.device("cpu")}
    per_module: dict[str, dict[str, Tensor]] = {}
    for name, grads in grads_by_module.items():
        if not grads:
            per_module[name] = {k: torch.zeros((), **f64) for k in GRAD_FIELDS}
            continue
        grads = [g.detach() for g in grads]
        l2 = torch.stack(torch._foreach_norm(grads, 2)).double()
        # L1 and the max from the absolute values: on CPU, _foreach_norm(ord=1) and aminmax cost
        # 2x and 1.5x the sum and amax of one _foreach_abs (laptop model: 2.4 -> 1.7 ms per log step).
        # Per-tensor reductions stay in the gradients' dtype (a float64 upcast per tensor costs 3x
        # more on CPU); the cross-tensor totals are float64.
        magnitudes = torch._foreach_abs(grads)
        abs_sum, abs_max = (torch.stack(x).double() for x in zip(*((a.sum(), a.amax()) for a in magnitudes),
                                                                      strict=True))
        signed = torch.stack([g.sum() for g in grads]).double()
        per_module[name] = {"grad_abs_sum": abs_sum.sum(), "grad_sum": signed.sum(), "grad_sq_sum": l2.pow(2).sum(),
                            "grad_abs_max": abs_max.amax(),
                            "grad_elems": torch.full((), float(sum(g.numel() for g in grads)), **f64)}
    total = {}
    for k in GRAD_FIELDS:  # across modules: the max of maxima, the sum of everything else
        column = torch.stack([m[k] for m in per_module.values()]) if per_module else torch.zeros(1, **f64)
        total[k] = column.amax() if k == "grad_abs_max" else column.sum()
    return total, {name: m["grad_sq_sum"] for name, m in per_module.items()}


def merge_grad_rows(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """One GRAD_FIELDS row from the rows of disjoint parts of the gradients (FSDP: each rank's
    shard): the max of the maxima, the sum of every other field (sums, sums of squares, element
    counts), so that :func:`summarize_grads` of the result describes the whole gradient."""
    return {k: (max if k == "grad_abs_max" else sum)(row[k] for row in rows) for k in GRAD_FIELDS}


def summarize_grads(row: dict[str, float], scale: float = 1.0) -> dict[str, float]:
    """grad_mean / grad_std / grad_max from a GRAD_FIELDS row; ``scale`` undoes a uniform clip."""
    n = max(row["grad_elems"], 1.0)
    mean_signed = row["grad_sum"] / n
    return {
        "grad_mean": scale * row["grad_abs_sum"] / n,
        "grad_std": scale * math.sqrt(max(row["grad_sq_sum"] / n - mean_signed * mean_signed, 0.0)),
        "grad_max": scale * row["grad_abs_max"],
    }


def retrieval_recall(image_embedding: Tensor, text_embedding: Tensor, caption_ids: Tensor,
                     ks: tuple[int, ...] = (1, 5), chunk: int = 1024) -> dict[str, Tensor]:
    """Image<->caption retrieval over a set of N pairs by cosine similarity.

    ``i2t_R@k``: share of images for which one of the k most similar captions is the image's own
    caption. ``t2i_R@k``: share of captions for which one of the k most similar images has it.
    Captions are compared by token ids, so a caption that occurs several times in the set counts
    as a hit at any of its occurrences (rank ties between identical captions do not penalise).
    Similarities are computed ``chunk`` queries at a time to bound memory at O(chunk x N).
    """
    zi = F.normalize(image_embedding.float(), dim=-1)
    zt = F.normalize(text_embedding.float(), dim=-1)
    n = zi.shape[0]
    # Group identical captions: same[i, j] is True when caption i and caption j are identical.
    _, group = torch.unique(caption_ids, dim=0, return_inverse=True)
    out: dict[str, Tensor] = {}
    for name, queries, keys in (("i2t", zi, zt), ("t2i", zt, zi)):
        hits = {k: torch.zeros((), device=zi.device) for k in ks}
        for start in range(0, n, chunk):
            sim = queries[start:start + chunk] @ keys.t()
            top = sim.topk(min(max(ks), n), dim=1).indices
            match = group[top] == group[start:start + chunk, None]
            for k in ks:
                hits[k] += match[:, :k].any(dim=1).sum()
        for k in ks:
            out[f"{name}_R@{k}"] = hits[k] / max(n, 1)
    return out
