"""Alignment over the global batch (``model.global_alignment``): with 2 real gloo processes the
InfoNCE loss and the DDP-averaged gradients equal one process's on the concatenated batch.

The 2-process part runs this file as a script under ``torchrun --standalone`` (a real launcher, not
debug_launcher: forking a pytest process that already ran torch kernels deadlocks oneDNN
convolutions in the children). Each rank writes what it computed to ``OUT/rank{r}.pt``; the test
recomputes the 1-process reference here and compares.
"""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import REPO, tiny_config

from mmtrain.model import MultimodalModel, alignment_terms, contrastive_logits

VOCAB = 40
# Rows of the concatenated batch each rank holds: equal halves, as accelerate's even_batches
# gives in training (the gather requires them).
EVEN = ((0, 6), (6, 12))


def _model(global_alignment: bool) -> MultimodalModel:
    """The tiny preset's model (dropout 0: every forward of the same weights agrees), same seed."""
    cfg = tiny_config(Path("unused")).model
    torch.manual_seed(0)
    return MultimodalModel(dataclasses.replace(cfg, vocab_size=VOCAB, alignment_loss_weight=1.0,
                                               global_alignment=global_alignment))


def _batch(rows: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Rows ``[start, end)`` of one fixed batch of 12 samples (identical in every process)."""
    g = torch.Generator().manual_seed(1)
    n, length = 12, 24
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    lengths = torch.randint(3, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    batch = {"pixel_values": torch.rand(n, 1, 32, 32, generator=g), "input_ids": ids * mask, "attention_mask": mask}
    return {k: v[rows[0]:rows[1]] for k, v in batch.items()}


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _two_ranks(out_dir: str) -> None:
    """One rank of the 2-process run (the script's entry point)."""
    from mmtrain.config import TrainConfig
    from mmtrain.distributed import build_accelerator

    acc = build_accelerator(TrainConfig())  # the trainer's own: one gloo group, DDP-wrapped models
    rank = acc.process_index
    result = {}
    for switch in (True, False):
        model = acc.prepare(_model(switch))
        losses, outputs = model(_batch(EVEN[rank]))
        # DDP averages the gradients over the two ranks. (total_loss would not match: loss_caption
        # is a ratio over each rank's tokens; 0 x it makes every parameter take part, as DDP needs.)
        acc.backward(losses["loss_alignment"] + 0 * losses["total_loss"])
        result[switch] = {"loss_alignment": acc.reduce(losses["loss_alignment"].detach(), "mean"),
                          "similarity_shape": tuple(outputs["similarity"].shape), "grads": _grads(model.module)}
    # Evaluation mode never gathers (every rank's batch stays its own).
    model.eval()
    with torch.no_grad():
        result["eval_similarity_shape"] = tuple(model(_batch(EVEN[rank]))[1]["similarity"].shape)
    result["fsdp"] = _fsdp_step(rank)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    acc.end_training()


def _fsdp_step(rank: int) -> dict[str, torch.Tensor]:
    """FSDP2 (torch's fully_shard, as accelerate_configs/fsdp.yaml wraps: each layer and the root)
    on the even split: loss_alignment averaged over ranks and the full gradients. The gather is of
    activations, so nothing in it is FSDP-specific."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from mmtrain.distributed import scalars_as_vectors

    model = _model(True)
    scalars_as_vectors(model)  # FSDP2 refuses 0-d parameters (alignment.logit_scale)
    for layer in (*model.image_encoder.blocks, *model.caption_decoder.text_layers,
                  *model.caption_decoder.fusion_layers):
        fully_shard(layer)
    fully_shard(model)
    losses, _ = model(_batch(EVEN[rank]))
    (losses["loss_alignment"] + 0 * losses["total_loss"]).backward()
    loss = losses["loss_alignment"].detach().clone()
    dist.all_reduce(loss)
    grads = {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for n, p in model.named_parameters()}
    return {"loss_alignment": loss / dist.get_world_size(), "grads": grads}


def _reference(rows: tuple[int, int]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One process, no process group, the concatenated batch: (outputs, gradients of loss_alignment)."""
    model = _model(True)
    losses, outputs = model(_batch(rows))
    (losses["loss_alignment"] + 0 * losses["total_loss"]).backward()
    return outputs | {"loss_alignment": losses["loss_alignment"]}, _grads(model)


@pytest.mark.slow
def test_two_process_alignment_equals_one_process_on_the_concatenated_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           __file__, str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    ref_out, ref_grads = _reference((0, 12))

    on = [r[True] for r in ranks]
    assert on[0]["similarity_shape"] == on[1]["similarity_shape"] == (6, 12)  # own rows x every caption
    for r in on:
        torch.testing.assert_close(r["loss_alignment"], ref_out["loss_alignment"])
        assert r["grads"].keys() == ref_grads.keys()
        for name, grad in ref_grads.items():
            torch.testing.assert_close(r["grads"][name], grad, msg=name)
    assert ref_grads["alignment.logit_scale"].abs() > 1e-4  # the temperature's gradient is compared, not 0 = 0

    # Off: each rank contrasts its 6 samples only, a different loss and different gradients.
    off = ranks[0][False]
    assert off["similarity_shape"] == (6, 6)
    assert (off["loss_alignment"] - ref_out["loss_alignment"]).abs() > 1e-2
    assert not torch.allclose(off["grads"]["alignment.project.weight"], ref_grads["alignment.project.weight"],
                              rtol=1e-3, atol=1e-6)

    assert ranks[0]["eval_similarity_shape"] == (6, 6)

    fsdp = ranks[0]["fsdp"]
    torch.testing.assert_close(fsdp["loss_alignment"], ref_out["loss_alignment"])
    for name, grad in ref_grads.items():
        torch.testing.assert_close(fsdp["grads"][name].reshape(grad.shape), grad, msg=name)  # logit_scale: (1,)


def test_gathered_path_with_one_process_is_bit_identical():
    """The gathered code path in a real 1-process gloo group gives, bit for bit, the loss terms and
    gradients of the local path (and of the plain (B, B) InfoNCE)."""
    import torch.distributed as dist

    model = _model(True)
    g = torch.Generator().manual_seed(2)
    latent0, text0 = torch.randn(7, 32, generator=g), torch.randn(7, 32, generator=g)
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert not model.gathers_alignment()  # a 1-process group never gathers in forward
        results = []
        for gather in (False, True):
            model.zero_grad(set_to_none=True)
            latent, text = latent0.clone().requires_grad_(), text0.clone().requires_grad_()
            rows, columns, offset = model.alignment_logits(latent, text, model.alignment.scale(), gather)
            terms = alignment_terms(rows, columns, offset)
            terms.sum().backward()
            results.append((terms.detach(), latent.grad, text.grad, model.alignment.logit_scale.grad))
    finally:
        dist.destroy_process_group()
    plain = alignment_terms(contrastive_logits(latent0, text0, model.alignment.scale()))
    assert torch.equal(results[0][0], plain.detach())
    for local, gathered in zip(*results, strict=True):
        assert torch.equal(local, gathered)


if __name__ == "__main__":
    _two_ranks(sys.argv[1])
