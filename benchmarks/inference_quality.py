"""Caption and retrieval quality of an exported model on an image folder with known captions.

    mmtrain export-data --config configs/laptop.yaml --split validation --count 50 --out val50/
    python benchmarks/inference_quality.py runs/laptop/model val50/

Reads DIR/metadata.jsonl (file_name, caption), as ``mmtrain export-data`` writes it, and reports:

* word accuracy: greedy caption vs. ground truth compared word by word at the same position,
  matches / ground-truth words (a word-level, teacher-free counterpart of ``caption_accuracy``);
* exact match: share of images whose greedy caption equals the ground truth;
* retrieval R@1 / R@5, text -> image and image -> text, over the folder's images, where identical
  captions count as the same caption (as ``val/i2t_R@k`` in training).
"""

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmtrain.inference import embed_captions, embed_images, load_pretrained, predict  # noqa: E402
from mmtrain.metrics import retrieval_recall  # noqa: E402
from mmtrain.tokenizer import encode  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("image_dir")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    root = Path(args.image_dir)
    meta = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines() if line.strip()]
    truth = {str(root / m["file_name"]): m["caption"] for m in meta}
    paths = [Path(p) for p in truth]
    model, tokenizer = load_pretrained(args.model_dir, args.device)

    records, failures = predict(model, tokenizer, paths, None, progress=False)
    assert not failures, failures
    words = hits = exact = 0
    for r in records:
        want, got = truth[r["path"]].lower().split(), r["caption"].lower().split()
        hits += sum(a == b for a, b in zip(want, got, strict=False))
        words += len(want)
        exact += want == got
    kept, image_emb, _ = embed_images(model, paths, progress=False)
    captions = [truth[str(p)] for p in kept]
    text_emb = embed_captions(model, tokenizer, captions)
    ids = encode(tokenizer, captions, model.config.max_caption_length)["input_ids"]
    recall = {k: float(v) for k, v in retrieval_recall(image_emb, text_emb, ids.to(image_emb.device)).items()}

    n = len(records)
    print(f"{n} images from {root}, model {args.model_dir}")
    print(f"word accuracy   {hits / words:.3f}  ({hits}/{words} ground-truth words at the right position)")
    print(f"exact captions  {exact / n:.3f}  ({exact}/{n})")
    print("retrieval       " + "  ".join(f"{k} {v:.3f}" for k, v in recall.items()))
    mean_mse = sum(r["reconstruction_mse"] for r in records) / n
    print(f"reconstruction  mean MSE {mean_mse:.5f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
