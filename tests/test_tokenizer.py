"""Tokenizer: vocabulary from the data, padding/truncation, save/load."""

import torch

from mmtrain.tokenizer import SPECIAL_TOKENS, build_tokenizer, encode, load_tokenizer

CAPTIONS = ["An engraving of two circles above a hatched square",
            "an engraving of a star",
            "an engraving of three black stars"]


def test_vocabulary_comes_from_the_data():
    tok = build_tokenizer(CAPTIONS, 16)
    words = {w for c in CAPTIONS for w in c.lower().split()}
    assert len(tok) == len(SPECIAL_TOKENS) + len(words)
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]


def test_round_trip_and_unknown_words():
    tok = build_tokenizer(CAPTIONS, 16)
    enc = encode(tok, CAPTIONS, 16)
    assert tok.batch_decode(enc["input_ids"], skip_special_tokens=True) == [c.lower() for c in CAPTIONS]
    ids = encode(tok, ["an engraving of a unicorn"], 16)["input_ids"][0].tolist()
    assert tok.unk_token_id in ids


def test_padding_truncation_and_mask():
    tok = build_tokenizer(CAPTIONS, 6)
    enc = encode(tok, ["an engraving of a star", "an engraving of two circles above a hatched square"], 8)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.shape == mask.shape == (2, 8)
    assert ids[:, 0].tolist() == [1, 1]  # [BOS]
    assert ids[0].tolist()[6:] == [2, 0] and mask[0].tolist() == [1] * 7 + [0]  # BOS, 5 words, EOS, pad
    assert ids[1, -1].item() == 2 and mask[1].all()  # truncated, [EOS] kept
    assert torch.equal(mask.bool(), ids != 0)


def test_vocabulary_independent_of_caption_order():
    a = build_tokenizer(CAPTIONS, 16).get_vocab()
    b = build_tokenizer(list(reversed(CAPTIONS)), 16).get_vocab()
    assert a == b


def test_save_and_auto_load(tmp_path):
    tok = build_tokenizer(CAPTIONS, 16)
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert torch.equal(encode(tok, CAPTIONS, 16)["input_ids"], encode(again, CAPTIONS, 16)["input_ids"])
    assert again.pad_token == "[PAD]" and again.eos_token == "[EOS]"
