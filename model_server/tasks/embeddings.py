"""Sentence embeddings for /v1/embeddings: an encoder, mean pooling, unit length.

Mean pooling over the attention mask followed by L2 normalisation is what sentence-transformers
models expect and what makes cosine similarity a dot product, as with OpenAI's embeddings.
``dimensions`` truncates and renormalises (Matryoshka style).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModel, AutoTokenizer

from model_server.config import ModelSpec
from model_server.errors import bad_param
from model_server.schemas import EmbeddingRequest, EmbeddingResult
from model_server.tasks.loading import pretrained_kwargs
from model_server.tasks.text_batches import batches, max_input_length, pad_token_ids, tokenize
from model_server.workers import Job


def load(spec: ModelSpec, device: str) -> Embedder:
    kwargs = pretrained_kwargs(spec, device)
    tokenizer = AutoTokenizer.from_pretrained(
        spec.source, local_files_only=kwargs.get("local_files_only", False)
    )
    model = AutoModel.from_pretrained(spec.source, **kwargs).to(device).eval()
    return Embedder(model, tokenizer, device)


class Embedder:
    def __init__(self, model: Any, tokenizer: Any, device: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dimensions = int(model.config.hidden_size)
        self.max_length = max_input_length(model, tokenizer)

    def check(self, request: EmbeddingRequest) -> None:
        if request.dimensions is not None and request.dimensions > self.dimensions:
            raise bad_param(
                "dimensions",
                f"this model's embeddings have {self.dimensions} dimensions, "
                f"got dimensions={request.dimensions}",
            )

    def run(self, request: EmbeddingRequest, job: Job[Any]) -> EmbeddingResult:
        items: tuple[Any, ...] = request.texts or request.token_ids or ()
        vectors: list[tuple[float, ...]] = []
        tokens = 0
        for _, chunk in batches(items):
            job.raise_if_cancelled()
            inputs = self._inputs(chunk, pretokenised=request.texts is None)
            tokens += int(inputs["attention_mask"].sum())
            with torch.inference_mode():
                hidden = self.model(**inputs).last_hidden_state
            pooled = _mean_pool(hidden, inputs["attention_mask"])
            if request.dimensions is not None:
                pooled = pooled[:, : request.dimensions]
            pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
            vectors.extend(tuple(row) for row in pooled.cpu().tolist())
        return EmbeddingResult(vectors=tuple(vectors), prompt_tokens=tokens)

    def _inputs(self, chunk: Any, *, pretokenised: bool) -> dict[str, torch.Tensor]:
        if not pretokenised:
            return tokenize(self.tokenizer, chunk, self.max_length, self.device)
        pad = self.tokenizer.pad_token_id or 0
        vocab = int(self.model.config.vocab_size)
        return pad_token_ids(chunk, pad, vocab, self.max_length, self.device)


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
