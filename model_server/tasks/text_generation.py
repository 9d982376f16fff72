"""Causal language models for /v1/chat/completions and /v1/completions.

Generation uses ``model.generate`` with one hook that runs on the device thread after every
token: a stopping criterion that counts the token, releases its text (see ``detokenize``) to
the HTTP stream, and ends generation when the client has gone away or a stop sequence has
appeared. No forward pass runs after either.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    StoppingCriteria,
    StoppingCriteriaList,
)

from model_server.config import ModelSpec
from model_server.errors import bad_param
from model_server.schemas import (
    ChatMessage,
    TextChoice,
    TextDelta,
    TextGenerationRequest,
    TextGenerationResult,
    TextStarted,
)
from model_server.tasks.detokenize import IncrementalText
from model_server.tasks.loading import pretrained_kwargs
from model_server.workers import STEP_TOKEN, Job

DEFAULT_CONTEXT = 2048
DEFAULT_CHAT_MAX_TOKENS = 256
DEFAULT_COMPLETION_MAX_TOKENS = 16  # the OpenAI default for /v1/completions


def load(spec: ModelSpec, device: str) -> TextGenerator:
    kwargs = pretrained_kwargs(spec, device)
    tokenizer = AutoTokenizer.from_pretrained(
        spec.source, local_files_only=kwargs.get("local_files_only", False)
    )
    model = AutoModelForCausalLM.from_pretrained(spec.source, **kwargs).to(device).eval()
    return TextGenerator(model, tokenizer, device)


def fallback_chat_prompt(messages: tuple[ChatMessage, ...]) -> str:
    """For tokenizers without a chat template: ``Role: content`` lines, then ``Assistant:``."""
    lines = [f"{m.role.capitalize()}: {m.content}" for m in messages]
    return "\n".join([*lines, "Assistant:"])


class TextGenerator:
    def __init__(self, model: Any, tokenizer: Any, device: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.context_length = _context_length(model, tokenizer)
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids: frozenset[int] = frozenset(
            [] if eos is None else eos if isinstance(eos, list) else [eos]
        )
        pad = tokenizer.pad_token_id
        self.pad_id: int | None = pad if pad is not None else next(iter(self.eos_ids), None)

    def run(self, request: TextGenerationRequest, job: Job[Any]) -> TextGenerationResult:
        """Generate ``request.n`` choices; a streaming job also gets TextStarted/TextDelta."""
        stream = job.streaming
        prompt_ids = self._encode(request)
        prompt_tokens = len(prompt_ids)
        max_tokens = self._max_tokens(request, prompt_tokens)
        if stream:
            job.emit(TextStarted(prompt_tokens))
        if request.sampling.seed is not None:
            torch.manual_seed(request.sampling.seed)
        on_text = (lambda text: job.emit(TextDelta(text))) if stream else None
        choices = tuple(
            self._generate_one(prompt_ids, max_tokens, request, job, on_text)
            for _ in range(request.n)
        )
        return TextGenerationResult(choices=choices, prompt_tokens=prompt_tokens)

    def _encode(self, request: TextGenerationRequest) -> list[int]:
        if request.messages is not None:
            text, param = self._render_chat(request.messages), "messages"
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            text, param = request.prompt or "", "prompt"
            ids = self.tokenizer(text)["input_ids"]
        if not ids:  # an empty prompt: start from the model's start (or end) of text token
            start = self.tokenizer.bos_token_id
            if start is None:
                start = next(iter(self.eos_ids), None)
            if start is None:
                raise bad_param(param, f"'{param}' is empty and the model has no start token")
            ids = [start]
        if len(ids) >= self.context_length:
            raise bad_param(
                param,
                f"This model's maximum context length is {self.context_length} tokens; "
                f"the {param} has {len(ids)} tokens, leaving no room for a completion",
                code="context_length_exceeded",
            )
        return list(ids)

    def _render_chat(self, messages: tuple[ChatMessage, ...]) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            return fallback_chat_prompt(messages)
        try:
            return self.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=True,
                tokenize=False,
            )
        except Exception as exc:  # templates raise for e.g. roles they do not support
            raise bad_param("messages", f"the model's chat template rejected them: {exc}") from exc

    def _max_tokens(self, request: TextGenerationRequest, prompt_tokens: int) -> int:
        room = self.context_length - prompt_tokens
        wanted = request.sampling.max_tokens
        if wanted is None:
            default = (
                DEFAULT_CHAT_MAX_TOKENS
                if request.messages is not None
                else DEFAULT_COMPLETION_MAX_TOKENS
            )
            return min(default, room)
        if wanted > room:
            raise bad_param(
                "max_tokens",
                f"This model's maximum context length is {self.context_length} tokens; you "
                f"asked for {prompt_tokens} prompt tokens plus max_tokens={wanted}",
                code="context_length_exceeded",
            )
        return wanted

    def _generate_one(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        request: TextGenerationRequest,
        job: Job[Any],
        on_text: Callable[[str], None] | None,
    ) -> TextChoice:
        sampling = request.sampling
        text = IncrementalText(self._decode, sampling.stop)
        greedy = sampling.temperature == 0
        config = GenerationConfig(
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens if sampling.ignore_eos else None,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None if greedy else 0,  # OpenAI has no top-k; 0 turns the HF default off
            eos_token_id=sorted(self.eos_ids) or None,
            pad_token_id=self.pad_id,
        )
        input_ids = torch.tensor([prompt_ids], device=self.device)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=config,
                stopping_criteria=StoppingCriteriaList(
                    [_TokenWatcher(job, text, len(prompt_ids), on_text)]
                ),
            )
        job.raise_if_cancelled()
        new_ids = output[0, len(prompt_ids) :].tolist()
        tail = text.finish()
        if tail and on_text is not None:
            on_text(tail)
        ended_on_eos = bool(new_ids) and new_ids[-1] in self.eos_ids and not sampling.ignore_eos
        reason = "stop" if text.stopped or ended_on_eos else "length"
        return TextChoice(text=text.text, finish_reason=reason, completion_tokens=len(new_ids))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )


class _TokenWatcher(StoppingCriteria):
    """Sees every new token on the device thread, between forward passes.

    It counts the token, releases its text to the stream, and ends generation when the client
    has gone or a stop sequence has appeared. A stopping criterion (not a streamer) does this
    because ``generate`` consults it right after each token is chosen, before the next
    forward pass, whichever order the installed transformers calls streamers in.
    """

    def __init__(
        self,
        job: Job[Any],
        text: IncrementalText,
        prompt_length: int,
        on_text: Callable[[str], None] | None,
    ) -> None:
        self._job = job
        self._text = text
        self._seen = prompt_length
        self._on_text = on_text

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        new_ids = input_ids[0, self._seen :].tolist()
        self._seen = input_ids.shape[1]
        for token_id in new_ids:
            self._job.step(STEP_TOKEN)
            delta = self._text.push(int(token_id))
            if delta and self._on_text is not None:
                self._on_text(delta)
        done = self._job.cancelled or self._text.stopped
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def _context_length(model: Any, tokenizer: Any) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    return DEFAULT_CONTEXT
