"""Tokenizer: vocabulary from the data, round trip, padding/truncation, save/load, unknown words."""

import pytest
import torch
from transformers import AutoTokenizer

from mmtrain.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, UNK, build_tokenizer, encode, load_tokenizer

CAPTIONS = [
    "An engraving of two circles above a hatched square",
    "an engraving of a star",
    "AN ENGRAVING OF three black stars, within a border.",
    "an engraving of a large outlined cross to the left of a small stippled hexagon",
]


def _words(captions):
    return {w for c in captions for w in c.lower().replace(",", " , ").replace(".", " . ").split()}


@pytest.fixture
def tok():
    return build_tokenizer(CAPTIONS, 24)


def test_special_tokens_have_fixed_ids(tok):
    assert SPECIAL_TOKENS == [PAD, BOS, EOS, UNK]
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == [0, 1, 2, 3]


def test_vocabulary_size_comes_from_the_data(tok):
    words = _words(CAPTIONS)
    assert len(tok) == len(SPECIAL_TOKENS) + len(words)
    assert set(tok.get_vocab()) == set(SPECIAL_TOKENS) | words
    assert sorted(tok.get_vocab().values()) == list(range(len(tok)))  # dense ids
    bigger = build_tokenizer([*CAPTIONS, "an engraving of a zebra"], 24)
    assert len(bigger) == len(tok) + 1


def test_round_trip_gives_the_lower_cased_text(tok):
    enc = encode(tok, CAPTIONS, 24)
    assert tok.batch_decode(enc["input_ids"], skip_special_tokens=True) == [c.lower() for c in CAPTIONS]
    for caption, ids in zip(CAPTIONS, enc["input_ids"], strict=True):
        assert tok.decode(ids, skip_special_tokens=True) == caption.lower()
        assert tok.unk_token_id not in ids.tolist()


def test_words_map_to_their_own_ids(tok):
    ids = encode(tok, ["an engraving of a star"], 8)["input_ids"][0].tolist()
    assert ids == [1, *tok.convert_tokens_to_ids(["an", "engraving", "of", "a", "star"]), 2, 0]


def test_padding_to_max_length_with_mask(tok):
    enc = encode(tok, ["an engraving of a star", "an engraving of two circles above a hatched square"], 14)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.shape == mask.shape == (2, 14) and ids.dtype == torch.long
    assert ids[:, 0].tolist() == [1, 1]  # [BOS] first
    assert ids[0, 6].item() == 2 and ids[0, 7:].tolist() == [0] * 7  # BOS, 5 words, EOS, then PAD=0
    assert mask[0].tolist() == [1] * 7 + [0] * 7
    assert ids[1, 10].item() == 2 and ids[1, 11:].tolist() == [0] * 3
    assert torch.equal(mask.bool(), ids != 0)


def test_truncation_keeps_bos_and_eos(tok):
    long = "an engraving of two circles above a hatched square"  # 9 words
    enc = encode(tok, [long], 6)
    ids = enc["input_ids"][0].tolist()
    assert ids == [1, *tok.convert_tokens_to_ids(["an", "engraving", "of", "two"]), 2]
    assert enc["attention_mask"][0].tolist() == [1] * 6
    exact = encode(tok, [long], 11)["input_ids"][0].tolist()  # 9 words + BOS + EOS fit exactly
    assert exact[0] == 1 and exact[-1] == 2 and 0 not in exact


def test_vocabulary_independent_of_caption_order(tok):
    for order in (list(reversed(CAPTIONS)), CAPTIONS[2:] + CAPTIONS[:2], [CAPTIONS[i] for i in (1, 3, 0, 2)]):
        assert build_tokenizer(order, 24).get_vocab() == tok.get_vocab()


def test_unknown_word_becomes_unk(tok):
    ids = encode(tok, ["an engraving of a unicorn"], 10)["input_ids"][0].tolist()
    assert ids[:7] == [1, *tok.convert_tokens_to_ids(["an", "engraving", "of", "a"]), 3, 2]
    assert tok.convert_tokens_to_ids("unicorn") == tok.unk_token_id == 3


def test_rare_words_become_unk_with_min_frequency():
    tok = build_tokenizer(["a star", "a star", "a circle"], 8, min_frequency=2)
    assert set(tok.get_vocab()) == {*SPECIAL_TOKENS, "a", "star"}
    assert encode(tok, ["a circle"], 5)["input_ids"][0].tolist() == [1, tok.convert_tokens_to_ids("a"), 3, 2, 0]


def test_save_pretrained_and_auto_tokenizer_give_identical_ids(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    for again in (AutoTokenizer.from_pretrained(str(tmp_path)), load_tokenizer(tmp_path)):
        assert again.get_vocab() == tok.get_vocab()
        probe = [*CAPTIONS, "an engraving of a unicorn", ""]
        a, b = encode(tok, probe, 12), encode(again, probe, 12)
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["attention_mask"], b["attention_mask"])
        assert [again.pad_token, again.bos_token, again.eos_token, again.unk_token] == [PAD, BOS, EOS, UNK]
        assert again.batch_decode(b["input_ids"], skip_special_tokens=True) == tok.batch_decode(
            a["input_ids"], skip_special_tokens=True)
        assert again.model_max_length == 24
