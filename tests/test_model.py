"""The model: shapes, losses against naive references, the CoCa split, size, export, generation; optim groups and
the learning-rate schedule."""

import dataclasses
import itertools
import math
import re

import pytest
import torch
from conftest import REPO
from torch import nn

from mmtrain.config import ModelConfig, OptimConfig
from mmtrain.errors import ConfigError
from mmtrain.model import MultimodalModel, loss_names
from mmtrain.optim import build_optimizer, build_scheduler, parameter_groups

# configs/tiny.yaml's model, with a small vocabulary and a shorter caption
CFG = ModelConfig(image_size=32, image_channels=1, latent_dim=32, image_encoder_layers=2, base_channels=8,
                  max_channels=16, embedding_dim=32, transformer_layers=2, text_layers=1, attention_heads=2,
                  prefix_tokens=2, max_caption_length=10, dropout=0.0, vocab_size=30)
B, T, V = 5, CFG.max_caption_length, CFG.vocab_size
PAD, BOS, EOS = 0, 1, 2


def _batch(seed=0, channels=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([10, 7, 4, 9, 3])  # tokens including [BOS] and [EOS]
    ids = torch.randint(4, V, (B, T), generator=g)
    ids[:, 0] = BOS
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    ids[torch.arange(B), lengths - 1] = EOS
    ids[mask == 0] = PAD
    return {"pixel_values": torch.rand(B, channels, 32, 32, generator=g), "input_ids": ids, "attention_mask": mask}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return MultimodalModel(CFG).eval()


def test_output_shapes(model):
    losses, out = model(_batch())
    assert set(losses) == set(loss_names())
    assert out["latent"].shape == (B, CFG.latent_dim)
    assert out["reconstruction"].shape == (B, 1, 32, 32)
    assert out["logits"].shape == (B, T, V)
    assert out["text_embedding"].shape == (B, CFG.latent_dim)
    assert out["similarity"].shape == (B, B)
    assert out["reconstruction"].min() >= 0.0 and out["reconstruction"].max() <= 1.0


def test_output_shapes_rgb():
    torch.manual_seed(0)
    m = MultimodalModel(dataclasses.replace(CFG, image_channels=3)).eval()
    _, out = m(_batch(channels=3))
    assert out["reconstruction"].shape == (B, 3, 32, 32)


def test_reconstruct_is_the_forward_reconstruction(model):
    batch = _batch()
    with torch.no_grad():
        assert torch.equal(model.reconstruct(batch["pixel_values"]), model(batch)[1]["reconstruction"])


def test_reconstruction_grid_keeps_grey_images_single_channel():
    from mmtrain.media import reconstruction_grid

    images, recon = torch.rand(3, 1, 8, 8), torch.rand(3, 1, 8, 8)
    grey = reconstruction_grid(images, recon)
    rgb = reconstruction_grid(images.expand(-1, 3, -1, -1), recon.expand(-1, 3, -1, -1))
    assert grey.shape == (3 * 10 + 2, 3 * 10 + 2) and rgb.shape == (*grey.shape, 3)
    assert (rgb == grey[..., None]).all()  # the same pixels: grey repeated in R, G and B
    assert grey[2:10, 2:10].tolist() == (images[0, 0] * 255).round().to(torch.uint8).tolist()


def test_losses_are_finite_scalars_and_total_is_the_weighted_sum():
    torch.manual_seed(0)
    weights = {"image_loss_weight": 2.0, "caption_loss_weight": 0.7, "alignment_loss_weight": 0.3}
    m = MultimodalModel(dataclasses.replace(CFG, **weights)).eval()
    losses, _ = m(_batch())
    for name in loss_names():
        assert losses[name].shape == () and torch.isfinite(losses[name]) and losses[name] > 0, name
    expected = 2.0 * losses["loss_image"] + 0.7 * losses["loss_caption"] + 0.3 * losses["loss_alignment"]
    assert losses["total_loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_default_weights(model):
    losses, _ = model(_batch())
    expected = losses["loss_image"] + losses["loss_caption"] + 0.5 * losses["loss_alignment"]
    assert losses["total_loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_loss_image_is_naive_mse(model):
    batch = _batch()
    losses, out = model(batch)
    recon, pixels = out["reconstruction"].flatten().tolist(), batch["pixel_values"].flatten().tolist()
    total = 0.0
    for r, x in zip(recon, pixels, strict=True):
        total += (r - x) ** 2
    assert losses["loss_image"].item() == pytest.approx(total / len(pixels), rel=1e-5)


def test_loss_caption_is_naive_token_cross_entropy(model):
    batch = _batch()
    losses, out = model(batch)
    logits, ids, mask = out["logits"].tolist(), batch["input_ids"].tolist(), batch["attention_mask"].tolist()
    total, count = 0.0, 0
    for i in range(B):
        for t in range(T - 1):  # the logits at t predict token t + 1
            if not mask[i][t + 1]:
                continue
            row = logits[i][t]
            top = max(row)
            log_z = top + math.log(sum(math.exp(v - top) for v in row))
            total += log_z - row[ids[i][t + 1]]
            count += 1
    assert count == int(batch["attention_mask"][:, 1:].sum())
    assert losses["loss_caption"].item() == pytest.approx(total / count, rel=1e-5)


def test_loss_alignment_is_naive_symmetric_infonce(model):
    losses, out = model(_batch())
    zi, zt = out["latent"].tolist(), out["text_embedding"].tolist()
    scale = min(math.exp(model.alignment.logit_scale.item()), 100.0)
    assert scale == pytest.approx(1 / CFG.init_temperature, rel=1e-5)

    def cos(a, b):
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    s = [[scale * cos(zi[i], zt[j]) for j in range(B)] for i in range(B)]
    image_to_text = text_to_image = 0.0
    for k in range(B):
        image_to_text += math.log(sum(math.exp(s[k][j]) for j in range(B))) - s[k][k]  # image k picks caption k
        text_to_image += math.log(sum(math.exp(s[i][k]) for i in range(B))) - s[k][k]  # caption k picks image k
    expected = (image_to_text / B + text_to_image / B) / 2
    assert losses["loss_alignment"].item() == pytest.approx(expected, rel=1e-5)


def test_caption_loss_ignores_padding(model):
    batch = _batch()
    other = {k: v.clone() for k, v in batch.items()}
    pads = other["attention_mask"] == 0
    assert pads.sum() > 10
    other["input_ids"][pads] = torch.randint(3, V, (int(pads.sum()),), generator=torch.Generator().manual_seed(1))
    (a, oa), (b, ob) = model(batch), model(other)
    assert torch.allclose(a["loss_caption"], b["loss_caption"], rtol=1e-6, atol=0)
    assert torch.allclose(oa["text_embedding"], ob["text_embedding"], atol=1e-6)  # read at [EOS], before the pads
    # ...while a real token does count
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][1, 3] = 5 if changed["input_ids"][1, 3] != 5 else 6
    assert not torch.allclose(a["loss_caption"], model(changed)[0]["loss_caption"])


def test_text_embedding_does_not_see_the_image(model):
    batch = _batch()
    noise = torch.rand(batch["pixel_values"].shape, generator=torch.Generator().manual_seed(9))
    other = dict(batch, pixel_values=noise)
    a, b = model(batch)[1], model(other)[1]
    assert torch.equal(a["text_embedding"], b["text_embedding"])
    assert not torch.allclose(a["latent"], b["latent"])
    assert not torch.allclose(a["logits"], b["logits"])  # the caption decoder does see the image


def test_default_preset_parameter_count():
    model = MultimodalModel(ModelConfig(vocab_size=1266))
    n = model.num_parameters()
    assert n == sum(p.numel() for p in model.parameters())
    assert n == 84_343_428
    assert abs(n - 85e6) / 85e6 < 0.05
    # The guide's 84,348,356 also counted a bias on every conv that feeds a GroupNorm (the norm cancels it);
    # those 4,928 redundant biases were dropped in commit 7b4eb2c.
    dropped = sum(m.out_channels for m in model.modules()
                  if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.bias is None)
    assert dropped == 4_928 and n + dropped == 84_348_356


@pytest.mark.parametrize("doc", [
    "README.md",
    "configs/default.yaml",
])
def test_documented_parameter_count_matches(doc):
    text = (REPO / doc).read_text()
    counts = {int(m.replace(",", "")) for m in re.findall(r"(8\d,\d{3},\d{3})\**\s+parameters", text)}
    assert counts == {84_343_428}


def test_save_pretrained_from_pretrained_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists() and (tmp_path / "model.safetensors").exists()
    loaded = MultimodalModel.from_pretrained(tmp_path).eval()
    assert loaded.config == CFG
    batch = _batch()
    (la, oa), (lb, ob) = model(batch), loaded(batch)
    for k in loss_names():
        assert torch.equal(la[k], lb[k]), k
    for k in ("latent", "reconstruction", "logits", "text_embedding"):
        assert torch.equal(oa[k], ob[k]), k
    px = batch["pixel_values"]
    assert torch.equal(model.generate(px, BOS, EOS), loaded.generate(px, BOS, EOS))


def _trained_model(steps=12):
    torch.manual_seed(0)
    m = MultimodalModel(CFG).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    batch = _batch()
    history = []
    for _ in range(steps):
        losses = m(batch)[0]
        history.append({k: v.item() for k, v in losses.items()})
        opt.zero_grad()
        losses["total_loss"].backward()
        opt.step()
    return m.eval(), batch, history


def test_a_few_steps_overfit_a_fixed_batch():
    _, _, history = _trained_model()
    first, last = history[0], history[-1]
    assert last["total_loss"] < 0.6 * first["total_loss"]
    assert last["loss_caption"] < first["loss_caption"] and last["loss_alignment"] < first["loss_alignment"]
    assert last["loss_image"] < first["loss_image"]


def test_generate_starts_with_bos_and_is_greedy():
    m, batch, _ = _trained_model()
    ids = m.generate(batch["pixel_values"], bos_token_id=BOS, eos_token_id=EOS)
    assert ids.dtype == torch.long and ids.shape[0] == B and 2 <= ids.shape[1] <= T
    assert (ids[:, 0] == BOS).all()
    assert m.generate(batch["pixel_values"], BOS, EOS, max_length=4).shape[1] <= 4
    # each token is the argmax of the teacher-forced logits on the tokens before it; after [EOS], only [EOS]
    _, out = m({"pixel_values": batch["pixel_values"], "input_ids": ids, "attention_mask": torch.ones_like(ids)})
    greedy = out["logits"][:, :-1].argmax(dim=-1)
    ended = 0
    for i in range(B):
        row = ids[i].tolist()
        end = row.index(EOS) if EOS in row else len(row) - 1  # the last generated position that was chosen
        assert row[1:end + 1] == greedy[i, :end].tolist(), row
        if EOS in row:
            ended += 1
            assert set(row[end:]) == {EOS}, row
    assert ended > 0
    assert ids.shape[1] == T or ended == B  # stops early only once every caption has ended


# --- optim ------------------------------------------------------------------------------------------------


def test_parameter_groups_put_biases_norms_and_embeddings_in_no_decay(model):
    decay, no_decay = parameter_groups(model, 0.1)
    assert (decay["name"], decay["weight_decay"]) == ("decay", 0.1)
    assert (no_decay["name"], no_decay["weight_decay"]) == ("no_decay", 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decayed | kept == set(names.values()) and not decayed & kept
    for n in ("caption_decoder.token_embedding.weight", "caption_decoder.position_embedding",
              "caption_decoder.prefix_position", "alignment.logit_scale", "alignment.norm.weight",
              "alignment.norm.bias", "caption_decoder.final_norm.weight", "image_encoder.to_latent.bias",
              "image_decoder.blocks.1.weight", "image_encoder.blocks.0.down.1.weight",
              "caption_decoder.text_layers.0.norm1.weight", "caption_decoder.text_layers.0.self_attn.in_proj_bias"):
        assert n in kept, n
    for n in decayed:
        assert "bias" not in n and "norm" not in n and "embedding" not in n, n
    assert {"image_encoder.to_latent.weight", "image_encoder.blocks.0.down.0.weight", "caption_decoder.prefix.weight",
            "alignment.project.weight", "caption_decoder.fusion_layers.0.linear1.weight",
            "caption_decoder.text_layers.0.self_attn.in_proj_weight"} <= decayed
    modules = dict(model.named_modules())
    for n in kept:
        owner = modules.get(n.rsplit(".", 1)[0])
        if isinstance(owner, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            assert n.endswith(".bias"), n  # no matrix of a linear or conv layer escapes decay


def test_build_optimizer_uses_the_groups(model):
    opt = build_optimizer(model, OptimConfig(lr=2e-3, weight_decay=0.05, beta1=0.8))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert all(g["lr"] == 2e-3 and g["betas"] == (0.8, 0.999) for g in opt.param_groups)


def _lrs(cfg, steps):
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, steps)
    used = []
    for _ in range(steps):
        used.append(opt.param_groups[0]["lr"])  # the rate this optimizer step runs at
        opt.step()
        sched.step()
    return used


def test_cosine_schedule_without_warmup():
    lr, min_lr, n = 1e-3, 1e-5, 10
    used = _lrs(OptimConfig(lr=lr, min_lr=min_lr, warmup_steps=0), n)
    assert used[0] == pytest.approx(lr, rel=1e-12)  # first step at lr
    assert used[-1] == pytest.approx(min_lr, rel=1e-9)  # last step at exactly min_lr
    expected = [min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * k / (n - 1))) for k in range(n)]
    assert used == pytest.approx(expected, rel=1e-9)
    assert all(a > b for a, b in itertools.pairwise(used))


def test_warmup_ramps_linearly_then_cosine():
    lr, min_lr, n, w = 1e-3, 1e-5, 12, 4
    used = _lrs(OptimConfig(lr=lr, min_lr=min_lr, warmup_steps=w), n)
    assert used[:w + 1] == pytest.approx([lr * k / w for k in range(w + 1)], rel=1e-9, abs=1e-15)
    assert used[-1] == pytest.approx(min_lr, rel=1e-9)
    decay = [min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * k / (n - 1 - w))) for k in range(n - w)]
    assert used[w:] == pytest.approx(decay, rel=1e-9)


def test_schedule_with_zero_min_lr_ends_at_zero():
    used = _lrs(OptimConfig(lr=1e-3, min_lr=0.0), 5)
    assert used[0] == pytest.approx(1e-3) and used[-1] == pytest.approx(0.0, abs=1e-15)


def test_warmup_longer_than_the_run_is_a_config_error():
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(ConfigError, match=r"optim\.warmup_steps=10 .* 10 optimizer steps"):
        build_scheduler(opt, OptimConfig(warmup_steps=10), 10)


def test_warmup_must_leave_a_step_of_decay():
    """With warmup 3 of 4 steps the last step would run at the peak lr, not at min_lr: refused."""
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(ConfigError, match=r"optim\.warmup_steps=3 .* 4 optimizer steps"):
        build_scheduler(opt, OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=3), 4)
    used = _lrs(OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=2), 4)
    assert used == pytest.approx([0.0, 5e-4, 1e-3, 1e-5])



def test_eval_alignment_is_infonce_over_consecutive_groups():
    """Naive reference: for each group of `size` samples in order, each sample's
    (image->text CE + text->image CE) / 2 against the others of its group, by explicit loops."""
    from mmtrain.model import eval_alignment

    gen = torch.Generator().manual_seed(0)
    latent, text = torch.randn(11, 6, generator=gen), torch.randn(11, 6, generator=gen)
    scale = torch.tensor(3.0)
    got = eval_alignment(latent, text, scale, group_size=4)

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    expected = []
    for start in range(0, 11, 4):
        idx = list(range(start, min(start + 4, 11)))
        for i in idx:
            row = [scale.item() * cos(latent[i], text[j]) for j in idx]
            col = [scale.item() * cos(latent[j], text[i]) for j in idx]
            k = idx.index(i)
            ce_row = -row[k] + math.log(sum(math.exp(v) for v in row))
            ce_col = -col[k] + math.log(sum(math.exp(v) for v in col))
            expected.append((ce_row + ce_col) / 2)
    assert got.shape == (11,)
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    assert got[8:].tolist() != pytest.approx(eval_alignment(latent, text, scale, 11)[8:].tolist(), rel=1e-3)
