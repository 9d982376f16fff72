"""Text-to-image with diffusers for /v1/images/generations.

Cancellation: the pipeline calls ``callback_on_step_end`` after every denoising step; when the
client has gone the callback raises :class:`JobCancelled`, which abandons the remaining steps
*and* the VAE decode (setting ``pipe._interrupt`` would skip the steps but still decode).
"""

from __future__ import annotations

import inspect
import io
from typing import Any

import torch

from model_server.config import ModelSpec
from model_server.errors import bad_param
from model_server.schemas import ImageRequest, ImageResult
from model_server.tasks.loading import has_accelerate, pretrained_kwargs
from model_server.workers import STEP_DENOISE, Job, JobCancelled


def load(spec: ModelSpec, device: str) -> ImageGenerator:
    from diffusers import AutoPipelineForText2Image

    kwargs = pretrained_kwargs(spec, device)
    if not has_accelerate():
        kwargs["low_cpu_mem_usage"] = False
    pipe = AutoPipelineForText2Image.from_pretrained(spec.source, **kwargs).to(device)
    pipe.set_progress_bar_config(disable=True)
    return ImageGenerator(pipe, device)


class ImageGenerator:
    def __init__(self, pipe: Any, device: str) -> None:
        self.pipe = pipe
        self.device = device
        self.size_multiple = int(getattr(pipe, "vae_scale_factor", 8))
        unet = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        sample = getattr(getattr(unet, "config", None), "sample_size", None)
        self.default_size = int(sample) * self.size_multiple if isinstance(sample, int) else 512
        params = inspect.signature(pipe.__call__).parameters
        self._step_callback = "callback_on_step_end" in params

    def check(self, request: ImageRequest) -> None:
        """Model-specific checks, run on the event loop before the request is queued."""
        for side in (request.width, request.height):
            if side % self.size_multiple:
                raise bad_param(
                    "size",
                    f"width and height must be multiples of {self.size_multiple} "
                    f"for this model, got {request.width}x{request.height}",
                )

    def run(self, request: ImageRequest, job: Job[Any]) -> ImageResult:
        generator = None
        if request.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(request.seed)
        extra: dict[str, Any] = {}
        if self._step_callback:
            extra["callback_on_step_end"] = _step_callback(job)
        with torch.inference_mode():
            output = self.pipe(
                prompt=request.prompt,
                negative_prompt=request.negative_prompt,
                height=request.height,
                width=request.width,
                num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale,
                num_images_per_prompt=request.n,
                generator=generator,
                output_type="pil",
                **extra,
            )
        job.raise_if_cancelled()
        pngs = tuple(_png(image) for image in output.images)
        steps = job.steps.get(STEP_DENOISE, request.steps)
        return ImageResult(
            png_images=pngs,
            width=request.width,
            height=request.height,
            steps=steps,
            prompt_tokens=self._prompt_tokens(request.prompt),
        )

    def _prompt_tokens(self, prompt: str) -> int:
        tokenizer = getattr(self.pipe, "tokenizer", None)
        if tokenizer is None:
            return 0
        limit = getattr(tokenizer, "model_max_length", None)
        ids = tokenizer(prompt, truncation=limit is not None, max_length=limit)["input_ids"]
        return len(ids)


def _step_callback(job: Job[Any]) -> Any:
    def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        job.step(STEP_DENOISE)
        if job.cancelled:
            raise JobCancelled()
        return tensors

    return on_step_end


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
