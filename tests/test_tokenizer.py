"""The offline SD 1.5 tokenizer must give OpenAI CLIP's ids, or prompts mean other things."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from meebs.models.tokenizer import _bytes_to_unicode, clip_tokenizer


def test_vocabulary_size_and_special_tokens() -> None:
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer.bos_token_id == 49406
    assert tokenizer.eos_token_id == 49407
    assert tokenizer.pad_token_id == 49407
    assert tokenizer.model_max_length == 77


def test_ids_match_openai_clip() -> None:
    # OpenAI's tokenizer encodes "a photo of a cat" as these ids (the CLIP README example).
    ids = clip_tokenizer()("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_first_ids_follow_openai_byte_order() -> None:
    tokenizer = clip_tokenizer()
    byte_chars = list(_bytes_to_unicode().values())
    assert tokenizer.convert_ids_to_tokens(list(range(256))) == byte_chars
    # 256 starts the byte chars + "</w>"; 512 is the first merge of the BPE file, "i n".
    assert tokenizer.convert_ids_to_tokens([0, 256, 512]) == ["!", "!</w>", "in"]
    assert tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [49406, 49407]


def test_round_trip_of_a_training_caption() -> None:
    tokenizer = clip_tokenizer()
    caption = "a drawing of meeb person"
    ids = tokenizer(caption).input_ids
    assert ids[0] == 49406 and ids[-1] == 49407
    assert tokenizer.decode(ids, skip_special_tokens=True) == caption


def test_pads_and_truncates_to_77() -> None:
    tokenizer = clip_tokenizer()
    batch = tokenizer(
        ["meeb", "word " * 200],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    assert tuple(batch.input_ids.shape) == (2, 77)
    assert batch.input_ids[0, 0].item() == 49406
    assert set(batch.input_ids[0, 3:].tolist()) == {49407}
    assert batch.input_ids[1, -1].item() == 49407


def test_built_once_per_process() -> None:
    assert clip_tokenizer() is clip_tokenizer()
