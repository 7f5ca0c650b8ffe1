"""Captions to text-encoder hidden states, the way kohya sd-scripts does it.

Two kohya features live here because both change what the UNet sees:
- clip skip n: take hidden_states[-n] and apply the final layer norm (n = 1 is the
  plain last layer);
- max token length 150/225: the caption is cut into chunks of 75 tokens, each chunk is
  encoded as its own 77-token sequence, and the results are joined, keeping the first
  chunk's BOS and the last chunk's EOS only (77, 152 or 227 positions in all).
"""

from __future__ import annotations

import torch
from torch import nn

CHUNK = 75  # tokens per CLIP window, without BOS and EOS


def tokenize(tokenizer, captions: list[str], max_token_length: int, pad_to_longest: bool):
    """Token ids [B, chunks * 77]: BOS, up to 75 tokens, EOS, padding, per chunk.

    `pad_to_longest` is kohya's `no_token_padding`: the batch is only padded as far as
    its longest caption needs (whole chunks stay 77 wide so positions keep their meaning).
    """
    chunks = max_token_length // CHUNK
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    body = tokenizer(captions, add_special_tokens=False, verbose=False)["input_ids"]
    body = [ids[: chunks * CHUNK] for ids in body]
    if pad_to_longest:
        longest = max((len(ids) for ids in body), default=0)
        chunks = max(1, -(-longest // CHUNK))
    rows = []
    for ids in body:
        row = []
        for c in range(chunks):
            part = ids[c * CHUNK : (c + 1) * CHUNK]
            row += [bos, *part, eos] + [pad] * (CHUNK - len(part))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def encode(text_encoder: nn.Module, input_ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    """Hidden states [B, positions, width] for ids made by `tokenize`."""
    batch, total = input_ids.shape
    chunks = total // (CHUNK + 2)
    flat = input_ids.reshape(batch * chunks, CHUNK + 2)
    out = text_encoder(flat, output_hidden_states=clip_skip > 1)
    if clip_skip > 1:
        hidden = out.hidden_states[-clip_skip]
        hidden = _final_layer_norm(text_encoder)(hidden)
    else:
        hidden = out.last_hidden_state
    hidden = hidden.reshape(batch, chunks, CHUNK + 2, -1)
    if chunks == 1:
        return hidden[:, 0]
    parts = [hidden[:, 0, :-1]]  # first chunk: BOS + tokens
    parts += [hidden[:, c, 1:-1] for c in range(1, chunks - 1)]
    parts.append(hidden[:, -1, 1:])  # last chunk: tokens + EOS
    return torch.cat(parts, dim=1)


def _final_layer_norm(text_encoder: nn.Module) -> nn.Module:
    """transformers 5 puts final_layer_norm on the model itself; 4.x under .text_model."""
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm
