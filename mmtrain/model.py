"""The engravings model: image -> latent -> (reconstruction, caption), aligned with the caption.

Single-device code. It knows nothing of Accelerate, ranks or logging: ``forward(batch)`` returns
``(losses, outputs)`` and the trainer decides what to do with them.

Architecture (CoCa-style split of the caption transformer):
- ``image_encoder``: strided conv blocks -> a ``latent_dim`` vector.
- ``image_decoder``: latent -> transposed conv blocks -> the image at input size, in [0, 1].
- ``caption_decoder``: the first ``text_layers`` causal layers read the caption alone; their state
  at [EOS] is the caption's text embedding. The remaining layers also attend to ``prefix_tokens``
  projected from the latent and predict the next token through the tied token embedding.
  Reading the caption alone first is what keeps the text embedding free of image information,
  so the alignment loss is a real test of agreement rather than a copy.
- ``alignment``: projects the text embedding into the latent space; a symmetric InfoNCE with a
  learned temperature between latent and projected text embedding is ``loss_alignment``.

Alignment over the global batch: in training, with a ``torch.distributed`` group of more than one
process and ``config.global_alignment``, each rank contrasts its own samples with the images and
captions of every rank's batch (:func:`gather_with_grad`, as open_clip's ``gather_features``). That
is the one place this module touches ``torch.distributed``; it uses torch's collectives directly,
never Accelerate, and is a no-op without an initialised group.
"""

import dataclasses
import itertools
import math
from collections.abc import Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn

from mmtrain.config import ModelConfig
from mmtrain.errors import ConfigError

# The loss components: logged name -> (per-sample term, its denominator term or None for "per
# sample", the ModelConfig field weighting it in total_loss). :func:`reduce_terms` is the only code
# that reads it; a new component is a new per-sample term in :func:`per_sample_terms`, a weight
# field and a line here.
LOSS_COMPONENTS: dict[str, tuple[str, str | None, str]] = {
    "loss_image": ("image_se", None, "image_loss_weight"),
    "loss_caption": ("caption_ce_sum", "caption_tokens", "caption_loss_weight"),
    "loss_alignment": ("alignment", None, "alignment_loss_weight"),
}


def loss_names() -> tuple[str, ...]:
    """``total_loss`` and every component, in logging order."""
    return ("total_loss", *LOSS_COMPONENTS)


def loss_terms() -> tuple[str, ...]:
    """The per-sample terms the components are built from (numerators and denominators)."""
    return tuple(dict.fromkeys(t for num, den, _ in LOSS_COMPONENTS.values() for t in (num, den) if t))


def _groups(channels: int) -> int:
    return 8 if channels % 8 == 0 else 1


def encoder_channels(cfg: ModelConfig) -> list[int]:
    return [min(cfg.base_channels * 2**i, cfg.max_channels) for i in range(cfg.image_encoder_layers)]


class DownBlock(nn.Module):
    """Strided 4x4 conv (halves the side) followed by a residual 3x3 conv at the new resolution."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        # No conv bias before a GroupNorm: the norm subtracts it again, so its gradient is zero.
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 4, stride=2, padding=1, bias=False),
                                  nn.GroupNorm(_groups(cout), cout), nn.SiLU())
        self.refine = nn.Sequential(nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                                    nn.GroupNorm(_groups(cout), cout), nn.SiLU())

    def forward(self, x: Tensor) -> Tensor:
        x = self.down(x)
        return x + self.refine(x)


class ImageEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        chans = encoder_channels(cfg)
        self.blocks = nn.Sequential(*(DownBlock(cin, cout) for cin, cout in
                                      zip([cfg.image_channels, *chans[:-1]], chans, strict=True)))
        side = cfg.image_size // 2**cfg.image_encoder_layers
        self.to_latent = nn.Linear(chans[-1] * side * side, cfg.latent_dim)

    def forward(self, images: Tensor) -> Tensor:
        return self.to_latent(self.blocks(images).flatten(1))


class ImageDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        chans = encoder_channels(cfg)[::-1]
        self.side = cfg.image_size // 2**cfg.image_encoder_layers
        self.channels = chans[0]
        self.from_latent = nn.Linear(cfg.latent_dim, chans[0] * self.side * self.side)
        blocks = []
        for cin, cout in itertools.pairwise(chans):
            blocks += [nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False),
                       nn.GroupNorm(_groups(cout), cout), nn.SiLU()]
        blocks.append(nn.ConvTranspose2d(chans[-1], cfg.image_channels, 4, stride=2, padding=1))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, latent: Tensor) -> Tensor:
        x = self.from_latent(latent).view(-1, self.channels, self.side, self.side)
        return torch.sigmoid(self.blocks(x))


def _layer(cfg: ModelConfig) -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(cfg.embedding_dim, cfg.attention_heads, 4 * cfg.embedding_dim, cfg.dropout,
                                      activation="gelu", batch_first=True, norm_first=True)


def _causal_mask(n: int, device: torch.device) -> Tensor:
    return torch.triu(torch.full((n, n), float("-inf"), device=device), diagonal=1)


class CaptionDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.embedding_dim
        self.token_embedding = nn.Embedding(cfg.vocab_size, d)
        self.position_embedding = nn.Parameter(torch.randn(cfg.max_caption_length, d) * 0.01)
        self.text_layers = nn.ModuleList(_layer(cfg) for _ in range(cfg.text_layers))
        self.prefix = nn.Linear(cfg.latent_dim, cfg.prefix_tokens * d)
        self.prefix_position = nn.Parameter(torch.randn(cfg.prefix_tokens, d) * 0.01)
        self.fusion_layers = nn.ModuleList(_layer(cfg) for _ in range(cfg.transformer_layers - cfg.text_layers))
        self.final_norm = nn.LayerNorm(d)
        self.prefix_tokens = cfg.prefix_tokens
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def encode_text(self, input_ids: Tensor) -> Tensor:
        """Causal layers over the caption alone: (B, T) ids -> (B, T, d) states."""
        n = input_ids.shape[1]
        x = self.token_embedding(input_ids) + self.position_embedding[:n]
        mask = _causal_mask(n, x.device)
        for layer in self.text_layers:
            x = layer(x, src_mask=mask, is_causal=True)
        return x

    def decode(self, text_states: Tensor, latent: Tensor) -> Tensor:
        """Latent-conditioned layers: text states (B, T, d) + latent -> next-token logits (B, T, V)."""
        b, _n, d = text_states.shape
        prefix = self.prefix(latent).view(b, self.prefix_tokens, d) + self.prefix_position
        x = torch.cat([prefix.to(text_states.dtype), text_states], dim=1)
        mask = _causal_mask(x.shape[1], x.device)
        for layer in self.fusion_layers:
            x = layer(x, src_mask=mask, is_causal=True)
        h = self.final_norm(x[:, self.prefix_tokens:])
        return F.linear(h, self.token_embedding.weight)  # tied input/output embedding


class AlignmentHead(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.embedding_dim)
        self.project = nn.Linear(cfg.embedding_dim, cfg.latent_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))

    def forward(self, text_states: Tensor, attention_mask: Tensor) -> Tensor:
        """Text embedding in latent space: the state at each caption's [EOS] (its last real token)."""
        last = attention_mask.sum(dim=1).clamp_min(1) - 1
        eos_state = text_states[torch.arange(text_states.shape[0], device=text_states.device), last]
        return self.project(self.norm(eos_state))

    def scale(self) -> Tensor:
        # CLIP's clamp: a temperature below 1/100 makes the softmax a hard max and training unstable.
        return self.logit_scale.clamp(max=math.log(100.0)).exp()


def contrastive_logits(image_latent: Tensor, text_embedding: Tensor, scale: Tensor) -> Tensor:
    """(B, M) cosine similarities of image i (of B) to caption j (of M), times the learned scale."""
    zi = F.normalize(image_latent.float(), dim=-1)
    zt = F.normalize(text_embedding.float(), dim=-1)
    return scale * zi @ zt.t()


def per_sample_terms(images: Tensor, reconstruction: Tensor, input_ids: Tensor, attention_mask: Tensor,
                     logits: Tensor, similarity: Tensor, columns: Tensor | None = None,
                     offset: int = 0) -> dict[str, Tensor]:
    """Per-sample loss terms. Batch losses and exact dataset-level eval means are both built from these.

    - ``image_se``: mean squared error over the sample's pixels.
    - ``caption_ce_sum`` / ``caption_tokens``: summed next-token cross-entropy and the number of
      predicted (non-pad) tokens, so a token-weighted mean can be formed over any set of samples.
    - ``alignment``: the sample's share of the symmetric InfoNCE: (image->text CE + text->image CE) / 2,
      over ``similarity`` (and ``columns``, ``offset`` for a share of a larger batch; see
      :func:`alignment_terms`).
    """
    image_se = (reconstruction.float() - images.float()).pow(2).flatten(1).mean(dim=1)
    targets, target_mask = input_ids[:, 1:], attention_mask[:, 1:].float()
    token_ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
    return {"image_se": image_se, "caption_ce_sum": (token_ce * target_mask).sum(dim=1),
            "caption_tokens": target_mask.sum(dim=1), "alignment": alignment_terms(similarity, columns, offset)}


def alignment_terms(similarity: Tensor, columns: Tensor | None = None, offset: int = 0) -> Tensor:
    """(B,) each sample's share of the symmetric InfoNCE: (image->text CE + text->image CE) / 2, in nats.

    With ``similarity`` alone: a (B, B) matrix whose diagonal holds the true pairs. For B samples
    that are rows ``offset .. offset+B-1`` of a larger batch of N (this rank's share of the global
    batch): ``similarity`` (B, N) holds their images against all N captions and ``columns`` (N, B)
    all N images against their captions, i.e. their rows and columns of the N x N matrix; each
    sample's terms are then exactly those it has in the N x N loss.
    """
    labels = torch.arange(offset, offset + similarity.shape[0], device=similarity.device)
    columns = similarity if columns is None else columns
    return (F.cross_entropy(similarity, labels, reduction="none")
            + F.cross_entropy(columns.t(), labels, reduction="none")) / 2


def gather_with_grad(*tensors: Tensor) -> tuple[list[Tensor], int]:
    """Collective (every rank of the default group): each tensor's rows from every rank,
    concatenated in rank order, and where this rank's rows start. (B, ...) -> (world * B, ...).

    Autograd flows back through the gather (its backward is a sum reduce-scatter): the gradient a
    rank's rows receive is the sum of what every rank's loss sends them, so with DDP's gradient
    averaging a loss computed from gathered rows trains as one process on the whole batch.
    Every rank must hold the same number of rows B: in training Accelerate's even batches
    guarantee it (the epoch's short last batch is completed from its start on every rank), and
    trusting it keeps the step free of a host read of the other ranks' counts (a device sync).
    """
    # torch's differentiable all-gather: torch 2.14 deprecates open_clip's
    # torch.distributed.nn.functional.all_gather in favour of this one. Imported here: a torch
    # built without distributed support lacks the module, and only multi-process runs get here.
    from torch.distributed._functional_collectives import all_gather_single, wait_tensor

    # Waited here, so no collective is left in flight if a caller uses only part of the result.
    out = [wait_tensor(all_gather_single(t.contiguous(), 0, dist.group.WORLD)) for t in tensors]
    return out, dist.get_rank() * tensors[0].shape[0]


def reduce_terms(config: ModelConfig, sums: Mapping[str, Tensor], samples: Tensor | float) -> dict[str, Tensor]:
    """The one reduction of per-sample terms to the loss components and their weighting to
    ``total_loss``: for a training batch (sums over its samples) and for the whole validation
    split (sums over every rank's samples) alike.

    ``sums`` holds, for each term :data:`LOSS_COMPONENTS` names, its sum over the samples;
    ``samples`` is how many there were. A component with a denominator term is a ratio of sums
    (``loss_caption``: a mean over predicted tokens); one without is a mean over samples.
    Returns ``{"total_loss", *components}`` as 0-d tensors in the dtype of ``sums``.
    """
    losses = {}
    for name, (numerator, denominator, _) in LOSS_COMPONENTS.items():
        losses[name] = sums[numerator] / (sums[denominator].clamp_min(1.0) if denominator else samples)
    total = None
    for name, (_, _, weight) in LOSS_COMPONENTS.items():
        term = getattr(config, weight) * losses[name]
        total = term if total is None else total + term
    return {"total_loss": total, **losses}


def eval_alignment(latent: Tensor, text_embedding: Tensor, scale: Tensor, group_size: int) -> Tensor:
    """(N,) per-sample alignment terms over a whole split in its order: the symmetric InfoNCE of
    each consecutive group of ``group_size`` samples (the last group may be smaller), each sample
    contrasted with the others of its group. Depends only on the split and the group size, not on
    how evaluation was batched or sharded across processes; with ``group_size`` the per-device
    training batch, a sample sees as many negatives as in training."""
    parts = [alignment_terms(contrastive_logits(lat, txt, scale))
             for lat, txt in zip(latent.split(group_size), text_embedding.split(group_size), strict=True)]
    return torch.cat(parts) if parts else latent.new_zeros(0)


class MultimodalModel(nn.Module, PyTorchModelHubMixin, library_name="mmtrain", tags=["mmtrain", "image-to-text"]):
    """Image encoder + image decoder + caption decoder + alignment head; see the module docstring."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set from the tokenizer before building the model")
        self.config = config
        self.image_encoder = ImageEncoder(config)
        self.image_decoder = ImageDecoder(config)
        self.caption_decoder = CaptionDecoder(config)
        self.alignment = AlignmentHead(config)

    def forward(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        images, input_ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
        latent = self.image_encoder(images)
        reconstruction = self.image_decoder(latent)
        text_states = self.caption_decoder.encode_text(input_ids)
        logits = self.caption_decoder.decode(text_states, latent)
        text_embedding = self.alignment(text_states, mask)
        scale = self.alignment.scale()
        similarity, columns, offset = self.alignment_logits(latent, text_embedding, scale, self.gathers_alignment())
        terms = per_sample_terms(images, reconstruction, input_ids, mask, logits, similarity, columns, offset)
        losses = self.reduce_losses(terms)
        # ``similarity`` is (B, N): this rank's images against the N captions the loss contrasted
        # them with (N = B unless gathered). ``scale`` is returned so that callers need not read the
        # parameter outside forward, where FSDP holds only a shard of it.
        outputs = {"latent": latent, "reconstruction": reconstruction, "logits": logits,
                   "text_embedding": text_embedding, "similarity": similarity, "scale": scale.detach(), **terms}
        return losses, outputs

    def gathers_alignment(self) -> bool:
        """Does this forward contrast with every rank's batch? Only in training mode (all ranks train
        at once, so the collective runs on all of them; eval and inference stay local) and in a
        process group of more than one process."""
        return (self.training and self.config.global_alignment and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1)

    def alignment_logits(self, latent: Tensor, text_embedding: Tensor, scale: Tensor,
                         gather: bool) -> tuple[Tensor, Tensor | None, int]:
        """The logits the alignment loss of this rank's B samples needs: ``(rows, columns, offset)``.

        Local (``gather`` False): rows is the (B, B) matrix, columns None, offset 0. Gathered
        (collective): rows (B, N) are this rank's images against the N captions of every rank's
        batch, columns (N, B) every image against this rank's captions, and offset where this
        rank's samples start in the global batch: each rank computes only its own rows and columns
        of the N x N matrix (open_clip's ``local_loss``), O(B x N), not O(N x N). The scale is not
        gathered: each rank's loss uses its own (identical) parameter, and DDP averages its gradient.
        ``latent`` (B, latent_dim), ``text_embedding`` (B, latent_dim), ``scale`` 0-d (or (1,): FSDP2's form).
        """
        if not gather:
            return contrastive_logits(latent, text_embedding, scale), None, 0
        (all_latent, all_text), offset = gather_with_grad(latent, text_embedding)
        rows = contrastive_logits(latent, all_text, scale)
        # A rank holding the whole batch (world size 1) uses the one matrix twice, bit for bit as
        # the local path does.
        if all_latent.shape[0] == latent.shape[0]:
            return rows, rows, offset
        return rows, contrastive_logits(all_latent, text_embedding, scale), offset

    def reduce_losses(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """Batch losses from per-sample terms (:func:`reduce_terms` over this batch)."""
        return reduce_terms(self.config, {k: terms[k].sum() for k in loss_terms()}, terms["image_se"].shape[0])

    @torch.no_grad()
    def generate(self, images: Tensor, bos_token_id: int, eos_token_id: int, max_length: int | None = None) -> Tensor:
        """Greedy captions for ``images``: (B, <= max_length) token ids starting with [BOS].

        Positions after a caption's [EOS] are filled with [EOS], which decoding skips as special.
        """
        max_length = min(max_length or self.config.max_caption_length, self.config.max_caption_length)
        latent = self.image_encoder(images)
        ids = torch.full((images.shape[0], 1), bos_token_id, dtype=torch.long, device=images.device)
        done = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
        for _ in range(max_length - 1):
            logits = self.caption_decoder.decode(self.caption_decoder.encode_text(ids), latent)[:, -1]
            nxt = torch.where(done, torch.full_like(done, eos_token_id, dtype=torch.long), logits.argmax(dim=-1))
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= nxt == eos_token_id
            if bool(done.all()):  # host sync per generated token: fine outside the training step
                break
        return ids

    def reconstruct(self, images: Tensor) -> Tensor:
        """(B, C, H, W) images -> their (B, C, H, W) reconstructions through the latent: ``forward``'s
        ``reconstruction``, from the image path alone (no caption decoder, no loss)."""
        return self.image_decoder(self.image_encoder(images))

    def embed_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Captions -> their embedding in the latent space (what the alignment loss compares)."""
        return self.alignment(self.caption_decoder.encode_text(input_ids), attention_mask)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(config: ModelConfig, vocab_size: int) -> MultimodalModel:
    """The model for a tokenizer of ``vocab_size`` tokens; ConfigError if ``model.vocab_size`` disagrees."""
    if config.vocab_size not in (0, vocab_size):
        raise ConfigError(f"model.vocab_size={config.vocab_size} but the tokenizer built from the training captions "
                          f"has {vocab_size} tokens; leave model.vocab_size at 0")
    return MultimodalModel(dataclasses.replace(config, vocab_size=vocab_size))
