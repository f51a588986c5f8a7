"""Word-level caption tokenizer built from the training captions.

A ``tokenizers`` WordLevel model (lower-cased, split on whitespace and punctuation) wrapped as a
``transformers.PreTrainedTokenizerFast``, so it saves with ``save_pretrained`` next to the model
and loads back with ``AutoTokenizer.from_pretrained``. The special tokens have fixed ids; the
model itself never needs them except to start and stop generation.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from tokenizers.trainers import WordLevelTrainer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "[PAD]", "[BOS]", "[EOS]", "[UNK]"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0, 1, 2, 3


def build_tokenizer(captions: Iterable[str], max_length: int, min_frequency: int = 1) -> PreTrainedTokenizerFast:
    """Train the vocabulary on ``captions``; its size comes from the data."""
    tok = Tokenizer(WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # WordLevel has no decoder of its own; WordPiece's joins words with spaces and glues
    # punctuation back, which is the inverse of the Whitespace pre-tokenizer for plain captions.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    trainer = WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=min_frequency)
    # Sorting makes the vocabulary independent of the dataset's order (ties are broken by the
    # trainer in insertion order), so every rank and every rerun builds the same ids.
    tok.train_from_iterator(sorted(captions), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        model_max_length=max_length, padding_side="right", truncation_side="right",
    )


def encode(tokenizer: PreTrainedTokenizerFast, captions: list[str], max_length: int) -> dict:
    """Pad or truncate to exactly ``max_length`` ([BOS] ... [EOS] [PAD]...), with an attention mask."""
    return tokenizer(captions, padding="max_length", truncation=True, max_length=max_length,
                     return_tensors="pt", return_token_type_ids=False)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(str(path))
