"""The model: shapes, losses against naive references, the CoCa split, export, generation."""

import math

import pytest
import torch

from mmtrain.config import ModelConfig, OptimConfig
from mmtrain.model import MultimodalModel
from mmtrain.optim import build_scheduler, parameter_groups

CFG = ModelConfig(image_size=32, image_channels=1, latent_dim=24, image_encoder_layers=2, base_channels=8,
                  max_channels=16, embedding_dim=16, transformer_layers=2, text_layers=1, attention_heads=2,
                  prefix_tokens=2, max_caption_length=10, dropout=0.0, vocab_size=30)


def _batch(b=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([10, 7, 4, 9, 3][:b])
    ids = torch.randint(4, 30, (b, 10), generator=g)
    ids[:, 0] = 1
    mask = (torch.arange(10)[None] < lengths[:, None]).long()
    ids[torch.arange(b), lengths - 1] = 2
    ids[mask == 0] = 0
    return {"pixel_values": torch.rand(b, 1, 32, 32, generator=g), "input_ids": ids, "attention_mask": mask}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return MultimodalModel(CFG).eval()


def test_shapes_and_weighted_total(model):
    losses, out = model(_batch())
    assert out["latent"].shape == (5, 24) and out["reconstruction"].shape == (5, 1, 32, 32)
    assert out["logits"].shape == (5, 10, 30) and out["text_embedding"].shape == (5, 24)
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    expected = losses["loss_image"] + losses["loss_caption"] + 0.5 * losses["loss_alignment"]
    assert torch.allclose(losses["total_loss"], expected)
    assert out["reconstruction"].min() >= 0.0 and out["reconstruction"].max() <= 1.0


def test_losses_match_naive_references(model):
    batch = _batch()
    losses, out = model(batch)
    # image: mean over every pixel
    diffs = [(r - x) ** 2 for r, x in zip(out["reconstruction"].flatten().tolist(),
                                          batch["pixel_values"].flatten().tolist(), strict=True)]
    assert losses["loss_image"].item() == pytest.approx(sum(diffs) / len(diffs), rel=1e-5)
    # caption: token cross-entropy over non-pad targets, by explicit log-softmax
    total, count = 0.0, 0
    for i in range(5):
        for t in range(9):
            if batch["attention_mask"][i, t + 1]:
                row = out["logits"][i, t].tolist()
                log_z = math.log(sum(math.exp(v) for v in row))
                total += log_z - row[batch["input_ids"][i, t + 1]]
                count += 1
    assert losses["loss_caption"].item() == pytest.approx(total / count, rel=1e-5)
    # alignment: symmetric InfoNCE on cosine similarities times the learned scale
    zi, zt = out["latent"].tolist(), out["text_embedding"].tolist()
    scale = math.exp(model.alignment.logit_scale.item())

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b, strict=False)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    s = [[scale * cos(zi[i], zt[j]) for j in range(5)] for i in range(5)]
    i2t = [math.log(sum(math.exp(v) for v in s[i])) - s[i][i] for i in range(5)]
    t2i = [math.log(sum(math.exp(s[i][j]) for i in range(5))) - s[j][j] for j in range(5)]
    assert losses["loss_alignment"].item() == pytest.approx((sum(i2t) + sum(t2i)) / 10, rel=1e-5)


def test_caption_loss_ignores_padding(model):
    batch = _batch()
    other = {k: v.clone() for k, v in batch.items()}
    other["input_ids"][other["attention_mask"] == 0] = 17
    assert torch.allclose(model(batch)[0]["loss_caption"], model(other)[0]["loss_caption"])


def test_text_embedding_does_not_see_the_image(model):
    batch = _batch()
    other = dict(batch, pixel_values=torch.rand_like(batch["pixel_values"]))
    a, b = model(batch)[1], model(other)[1]
    assert torch.equal(a["text_embedding"], b["text_embedding"])
    assert not torch.equal(a["logits"], b["logits"])  # the caption decoder does see it


def test_default_preset_parameter_count():
    n = MultimodalModel(ModelConfig(vocab_size=1266)).num_parameters()
    assert n == 84_343_428
    assert abs(n - 85e6) / 85e6 < 0.02


def test_export_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = MultimodalModel.from_pretrained(tmp_path).eval()
    assert loaded.config == CFG
    batch = _batch()
    a, b = model(batch), loaded(batch)
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])


def test_generate_starts_with_bos_and_stops(model):
    ids = model.generate(_batch()["pixel_values"], bos_token_id=1, eos_token_id=2)
    assert ids.shape[0] == 5 and ids.shape[1] <= 10 and (ids[:, 0] == 1).all()


def test_a_few_steps_overfit_a_batch():
    torch.manual_seed(0)
    model = MultimodalModel(CFG).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = _batch()
    first = model(batch)[0]["total_loss"].item()
    for _ in range(60):
        loss = model(batch)[0]["total_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_no_decay_for_biases_norms_embeddings(model):
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "caption_decoder.token_embedding.weight" in no_decay_names
    assert "alignment.logit_scale" in no_decay_names
    assert all(n.endswith(("bias", "position", "logit_scale")) or "norm" in n or "embedding" in n
               or ".blocks." in n for n in no_decay_names)
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize(("warmup", "steps"), [(0, 10), (3, 10)])
def test_schedule_starts_and_ends_where_configured(warmup, steps):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = build_scheduler(opt, OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=warmup), steps)
    used = []
    for _ in range(steps):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert used[-1] == pytest.approx(1e-5, rel=1e-9)  # the last optimizer step runs at min_lr
    if warmup == 0:
        assert used[0] == pytest.approx(1e-3)
    else:
        assert used[:warmup + 1] == pytest.approx([1e-3 * k / warmup for k in range(warmup + 1)])
    assert all(a >= b for a, b in zip(used[warmup:], used[warmup + 1:], strict=False))  # cosine only decreases
