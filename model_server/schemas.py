"""Parsed requests and task results: the records passed between HTTP handlers and task code.

Handlers turn JSON into these (validating every field), task code turns them into tensors.
Keeping them here, torch-free, lets the handlers be imported and tested without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI sampling fields. ``temperature == 0`` means greedy decoding."""

    max_tokens: int | None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False


@dataclass(frozen=True)
class TextGenerationRequest:
    """Either ``messages`` (chat) or ``prompt`` (completions) is set."""

    sampling: SamplingParams
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    n: int = 1


@dataclass(frozen=True)
class TextStarted:
    """First event of a streamed generation: the prompt passed the checks and is running."""

    prompt_tokens: int


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class TextChoice:
    text: str
    finish_reason: str  # "stop" or "length"
    completion_tokens: int


@dataclass(frozen=True)
class TextGenerationResult:
    choices: tuple[TextChoice, ...]
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)


@dataclass(frozen=True)
class ImageRequest:
    prompt: str
    n: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    negative_prompt: str | None = None
    seed: int | None = None


@dataclass(frozen=True)
class ImageResult:
    png_images: tuple[bytes, ...]
    width: int
    height: int
    steps: int
    prompt_tokens: int


@dataclass(frozen=True)
class EmbeddingRequest:
    """``texts`` or ``token_ids`` (OpenAI also accepts pre-tokenised input)."""

    texts: tuple[str, ...] | None = None
    token_ids: tuple[tuple[int, ...], ...] | None = None
    dimensions: int | None = None


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: tuple[tuple[float, ...], ...]
    prompt_tokens: int


@dataclass(frozen=True)
class LabelScore:
    label: str
    score: float


@dataclass(frozen=True)
class ClassificationResult:
    """One ranked label list per input, best first."""

    labels: tuple[tuple[LabelScore, ...], ...]
    prompt_tokens: int = 0
    images: int = 0
    pixels: int = 0


@dataclass(frozen=True)
class SummarizationRequest:
    texts: tuple[str, ...]
    max_tokens: int
    min_tokens: int = 0


@dataclass(frozen=True)
class SummarizationResult:
    summaries: tuple[str, ...]
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class ClassificationRequest:
    texts: tuple[str, ...]
    top_k: int | None = None


@dataclass(frozen=True)
class ImageClassificationRequest:
    """Encoded image files (PNG, JPEG, ...); decoding happens on the device thread."""

    images: tuple[bytes, ...] = field(repr=False)
    top_k: int | None = None
