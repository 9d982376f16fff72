"""Image classification (e.g. ViT) for /v1/image-classifications.

Images arrive encoded; they are decoded here, on the device thread, because decoding a large
JPEG is real work that belongs to the request (and must not stall the event loop).
"""

from __future__ import annotations

import io
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from transformers import AutoImageProcessor, AutoModelForImageClassification

from model_server.config import ModelSpec
from model_server.errors import bad_param
from model_server.schemas import ClassificationResult, ImageClassificationRequest, LabelScore
from model_server.tasks.loading import pretrained_kwargs
from model_server.tasks.text_batches import batches
from model_server.tasks.text_classification import rank_labels
from model_server.workers import Job

IMAGE_BATCH = 16


def load(spec: ModelSpec, device: str) -> ImageClassifier:
    kwargs = pretrained_kwargs(spec, device)
    processor = AutoImageProcessor.from_pretrained(
        spec.source, local_files_only=kwargs.get("local_files_only", False)
    )
    model = AutoModelForImageClassification.from_pretrained(spec.source, **kwargs)
    return ImageClassifier(model.to(device).eval(), processor, device)


class ImageClassifier:
    def __init__(self, model: Any, processor: Any, device: str) -> None:
        self.model = model
        self.processor = processor
        self.device = device
        self.dtype = next(model.parameters()).dtype

    def run(self, request: ImageClassificationRequest, job: Job[Any]) -> ClassificationResult:
        images = [decode_image(data, index) for index, data in enumerate(request.images)]
        pixels = sum(image.width * image.height for image in images)
        ranked: list[tuple[LabelScore, ...]] = []
        for _, chunk in batches(images, IMAGE_BATCH):
            job.raise_if_cancelled()
            inputs = self.processor(images=list(chunk), return_tensors="pt")
            values = inputs["pixel_values"].to(self.device, self.dtype)
            with torch.inference_mode():
                logits = self.model(pixel_values=values).logits
            ranked.extend(rank_labels(self.model.config, logits, request.top_k))
        return ClassificationResult(labels=tuple(ranked), images=len(images), pixels=pixels)


def decode_image(data: bytes, index: int) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise bad_param("image", f"image {index} is not a readable image file: {exc}") from exc
