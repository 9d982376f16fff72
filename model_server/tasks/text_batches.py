"""Tokenising lists of texts for encoder models, in bounded batches.

Batches bound the memory one request can take; between batches the job checks whether its
client is still there. Over-long inputs are an error (as in the OpenAI API), not silently cut.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from model_server.errors import bad_param

BATCH_SIZE = 32


def max_input_length(model: Any, tokenizer: Any) -> int:
    limits = [getattr(model.config, "max_position_embeddings", None)]
    limits.append(getattr(tokenizer, "model_max_length", None))
    usable = [v for v in limits if isinstance(v, int) and 0 < v < 1_000_000]
    return min(usable) if usable else 512


def batches(items: Sequence[Any], size: int = BATCH_SIZE) -> Iterator[tuple[int, Sequence[Any]]]:
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def tokenize(
    tokenizer: Any, texts: Sequence[str], max_length: int, device: str, param: str = "input"
) -> dict[str, torch.Tensor]:
    """Pad a batch; a text longer than the model's window is a 400 naming ``param``."""
    encoded = tokenizer(list(texts), padding=True, return_tensors="pt")
    lengths = encoded["attention_mask"].sum(dim=1).tolist()
    for offset, length in enumerate(lengths):
        if length > max_length:
            raise bad_param(
                param,
                f"input {offset} has {length} tokens; this model accepts at most {max_length}",
                code="context_length_exceeded",
            )
    return {k: v.to(device) for k, v in encoded.items()}


def pad_token_ids(
    rows: Sequence[Sequence[int]], pad_id: int, vocab_size: int, max_length: int, device: str
) -> dict[str, torch.Tensor]:
    """Pre-tokenised input (lists of ids), checked against the vocabulary and the window."""
    width = max(len(r) for r in rows)
    if width > max_length:
        raise bad_param(
            "input", f"an input has {width} tokens; this model accepts at most {max_length}"
        )
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if any(t < 0 or t >= vocab_size for t in row):
            raise bad_param("input", f"token ids must be in [0, {vocab_size})")
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
