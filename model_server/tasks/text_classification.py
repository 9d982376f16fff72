"""Sequence classification (sentiment, topic, ...) for /v1/classifications."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from model_server.config import ModelSpec
from model_server.schemas import ClassificationRequest, ClassificationResult, LabelScore
from model_server.tasks.loading import pretrained_kwargs
from model_server.tasks.text_batches import batches, max_input_length, tokenize
from model_server.workers import Job


def load(spec: ModelSpec, device: str) -> TextClassifier:
    kwargs = pretrained_kwargs(spec, device)
    tokenizer = AutoTokenizer.from_pretrained(
        spec.source, local_files_only=kwargs.get("local_files_only", False)
    )
    model = (
        AutoModelForSequenceClassification.from_pretrained(spec.source, **kwargs).to(device).eval()
    )
    return TextClassifier(model, tokenizer, device)


class TextClassifier:
    def __init__(self, model: Any, tokenizer: Any, device: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.max_length = max_input_length(model, tokenizer)

    def run(self, request: ClassificationRequest, job: Job[Any]) -> ClassificationResult:
        ranked: list[tuple[LabelScore, ...]] = []
        tokens = 0
        for _, chunk in batches(request.texts):
            job.raise_if_cancelled()
            inputs = tokenize(self.tokenizer, chunk, self.max_length, self.device)
            tokens += int(inputs["attention_mask"].sum())
            with torch.inference_mode():
                logits = self.model(**inputs).logits
            ranked.extend(rank_labels(self.model.config, logits, request.top_k))
        return ClassificationResult(labels=tuple(ranked), prompt_tokens=tokens)


def rank_labels(
    config: Any, logits: torch.Tensor, top_k: int | None
) -> list[tuple[LabelScore, ...]]:
    """Scores per label, best first: softmax, or sigmoid for multi-label models."""
    if getattr(config, "problem_type", None) == "multi_label_classification":
        probs = torch.sigmoid(logits.float())
    else:
        probs = torch.softmax(logits.float(), dim=-1)
    names = config.id2label
    rows = []
    for row in probs.cpu().tolist():
        order = sorted(range(len(row)), key=lambda i: row[i], reverse=True)[:top_k]
        rows.append(tuple(LabelScore(str(names.get(i, f"LABEL_{i}")), row[i]) for i in order))
    return rows
