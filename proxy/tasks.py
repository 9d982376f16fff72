"""The task names of DESIGN.md: every record and metric carries one of them."""

TASKS: tuple[str, ...] = (
    "text-generation",
    "image-generation",
    "embeddings",
    "text-classification",
    "summarization",
    "image-classification",
    "object-detection",
    "image-to-text",
    "speech-recognition",
    "text-to-speech",
    "other",
)
