"""Captions to hidden states: chunking for long captions, clip skip, token padding."""

import torch
from transformers import CLIPTextModel

from meebs.models.builtin_models import build_tiny
from meebs.models.text_encoding import encode, tokenize
from meebs.models.tokenizer import clip_tokenizer


def tiny_text_encoder() -> CLIPTextModel:
    return build_tiny().text_encoder


def test_single_chunk_is_bos_tokens_eos_padding():
    tok = clip_tokenizer()
    ids = tokenize(tok, ["meeb person"], 75, pad_to_longest=False)
    body = tok("meeb person", add_special_tokens=False)["input_ids"]
    assert ids.shape == (1, 77)
    assert ids[0, 0] == tok.bos_token_id
    assert ids[0, 1 : 1 + len(body)].tolist() == body
    assert ids[0, 1 + len(body)] == tok.eos_token_id
    assert (ids[0, 2 + len(body) :] == tok.pad_token_id).all()


def test_long_caption_is_split_into_chunks_of_75():
    tok = clip_tokenizer()
    caption = " ".join(["a"] * 100)  # 100 tokens
    ids = tokenize(tok, [caption], 150, pad_to_longest=False)
    assert ids.shape == (1, 154)
    first, second = ids[0, :77], ids[0, 77:]
    assert first[0] == second[0] == tok.bos_token_id
    assert first[76] == tok.eos_token_id  # 75 tokens fill the first chunk
    assert second[26] == tok.eos_token_id  # the remaining 25
    # beyond max_token_length the caption is cut, as kohya does
    assert tokenize(tok, [caption], 75, pad_to_longest=False).shape == (1, 77)


def test_no_token_padding_pads_only_to_the_longest_caption():
    tok = clip_tokenizer()
    short = tokenize(tok, ["a", "meeb person"], 225, pad_to_longest=True)
    assert short.shape == (2, 77)
    long = tokenize(tok, ["a", " ".join(["a"] * 80)], 225, pad_to_longest=True)
    assert long.shape == (2, 154)


def test_chunks_are_joined_keeping_first_bos_and_last_eos():
    tok, model = clip_tokenizer(), tiny_text_encoder()
    caption = " ".join(["a"] * 100)
    ids = tokenize(tok, [caption], 150, pad_to_longest=False)
    with torch.no_grad():
        joined = encode(model, ids, clip_skip=1)
        chunk0 = model(ids[:, :77]).last_hidden_state
        chunk1 = model(ids[:, 77:]).last_hidden_state
    assert joined.shape == (1, 152, 32)
    torch.testing.assert_close(joined[:, :76], chunk0[:, :76])
    torch.testing.assert_close(joined[:, 76:], chunk1[:, 1:])


def test_clip_skip_takes_an_earlier_layer_through_the_final_norm():
    tok, model = clip_tokenizer(), tiny_text_encoder()
    ids = tokenize(tok, ["a drawing of meeb person"], 75, pad_to_longest=False)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        expected = model.final_layer_norm(out.hidden_states[-2])
        skipped = encode(model, ids, clip_skip=2)
        last = encode(model, ids, clip_skip=1)
    torch.testing.assert_close(skipped, expected)
    torch.testing.assert_close(last, out.last_hidden_state)
    assert not torch.allclose(skipped, last)
