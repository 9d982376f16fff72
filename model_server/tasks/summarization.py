"""Sequence-to-sequence summarisation (e.g. T5, BART) for /v1/summarizations.

T5 checkpoints expect a ``summarize: `` prefix, which they declare in
``config.task_specific_params``; it is applied when present. Long inputs are truncated to the
encoder's window, as summarisation pipelines do; ``usage.prompt_tokens`` counts what was read.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    GenerationConfig,
    StoppingCriteria,
    StoppingCriteriaList,
)

from model_server.config import ModelSpec
from model_server.schemas import SummarizationRequest, SummarizationResult
from model_server.tasks.loading import pretrained_kwargs
from model_server.tasks.text_batches import batches, max_input_length
from model_server.workers import STEP_TOKEN, Job

SUMMARY_BATCH = 8


def load(spec: ModelSpec, device: str) -> Summarizer:
    kwargs = pretrained_kwargs(spec, device)
    tokenizer = AutoTokenizer.from_pretrained(
        spec.source, local_files_only=kwargs.get("local_files_only", False)
    )
    model = AutoModelForSeq2SeqLM.from_pretrained(spec.source, **kwargs).to(device).eval()
    return Summarizer(model, tokenizer, device)


class Summarizer:
    def __init__(self, model: Any, tokenizer: Any, device: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.max_length = max_input_length(model, tokenizer)
        params = getattr(model.config, "task_specific_params", None) or {}
        self.prefix = str(params.get("summarization", {}).get("prefix", ""))

    def run(self, request: SummarizationRequest, job: Job[Any]) -> SummarizationResult:
        summaries: list[str] = []
        prompt_tokens = completion_tokens = 0
        config = GenerationConfig(
            max_new_tokens=request.max_tokens,
            min_new_tokens=request.min_tokens or None,
            do_sample=False,
            num_beams=1,
            decoder_start_token_id=self.model.generation_config.decoder_start_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        for _, chunk in batches(request.texts, SUMMARY_BATCH):
            job.raise_if_cancelled()
            inputs = self.tokenizer(
                [self.prefix + text for text in chunk],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            prompt_tokens += int(inputs["attention_mask"].sum())
            with torch.inference_mode():
                output = self.model.generate(
                    **inputs,
                    generation_config=config,
                    stopping_criteria=StoppingCriteriaList([_DecoderSteps(job)]),
                )
            job.raise_if_cancelled()
            for row in output[:, 1:].tolist():  # column 0 is the decoder start token
                completion_tokens += _generated_length(row, self.tokenizer)
            summaries.extend(self.tokenizer.batch_decode(output, skip_special_tokens=True))
        return SummarizationResult(
            summaries=tuple(s.strip() for s in summaries),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )


def _generated_length(row: list[int], tokenizer: Any) -> int:
    """Tokens up to and including EOS; the padding after it was never generated."""
    eos = tokenizer.eos_token_id
    return row.index(eos) + 1 if eos in row else len(row)


class _DecoderSteps(StoppingCriteria):
    """After each decoder step: count its tokens (for the hook) and stop if the client left."""

    def __init__(self, job: Job[Any]) -> None:
        self._job = job

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        for _ in range(input_ids.shape[0]):
            self._job.step(STEP_TOKEN)
        done = self._job.cancelled
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)
