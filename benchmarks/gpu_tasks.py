"""Energy per request for each task on real-size models, measured with NVML.

For a machine with an NVIDIA GPU and torch with CUDA. It builds random-weight models of real
size from their configs (no downloads): a GPT-2-medium LM, a Stable-Diffusion-1.5-sized
pipeline at 512x512, BERT-base embeddings and classifier, a T5-small summariser and ViT-base.
It serves them with the model server in-process behind joulegate (the `nvml` meter), sends each
task's requests one at a time through joulegate, and reads NVML's total-energy counter around
them as a cross-check. It prints joulegate's Wh per request per task beside the counter's
window, and the ratio
of image generation to text generation (Luccioni et al. 2024 found about 62x: 2.907 vs 0.047
kWh per 1,000 inferences, on other models and settings).

    .venv/bin/python benchmarks/gpu_tasks.py [--requests 10] [--image-requests 3] [--json out.json]
        [--rows-json PATH]
    .venv/bin/python benchmarks/gpu_tasks.py --smoke   # tiny models on the CPU, no energy

Random weights cost the same compute as trained ones for a fixed amount of work, so every
request here does a fixed amount: generation ignores end-of-sequence and the summariser is
held to its token budget. Prompts are encoded with the tiny tokenizers, so token counts differ
from the real checkpoints'; ``usage`` in the table says what was processed.

Energy is the counter's difference over all of a task's requests divided by their number: the
counter updates every 20-100 ms, coarser than one classification request. Nothing else should
run on the GPU meanwhile. Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.results import INFO, Row, write_rows
from proxy.config import load_config as proxy_config
from proxy.recorder import Recorder
from proxy.server import RECORDER, create_app, serving
from proxy.study import study_figures

TEXT = (
    "Joulegate is a reverse proxy that meters the energy of every inference request. It "
    "samples the GPU's energy counter, splits each interval between the requests in flight "
    "and exports the result per task, model and tenant, so that teams can see which "
    "workloads cost the most and set budgets for them. "
)
SHORT_TEXT = TEXT.split(". ")[0] + "."  # fits the tiny encoders' 128-token window too


@dataclass(frozen=True)
class Workload:
    """One task's request: what the proxy will later forward, here sent straight to the server."""

    task: str
    model: str
    path: str
    body: dict[str, Any]
    requests: int


@dataclass
class Measurement:
    task: str
    model: str
    requests: int
    seconds_per_request: float
    wh_per_request: float | None  # NVML's counter over the task's window, per request
    joulegate_wh_per_request: float | None = None  # mean of joulegate's per-request records
    usage: dict[str, Any] = field(default_factory=dict)

    @property
    def kwh_per_1000(self) -> float | None:
        # Wh per request and kWh per 1,000 requests are the same number.
        return self.wh_per_request


class EnergyMeter:
    """NVML's total-energy counter (mJ since the driver loaded) for the GPU torch uses."""

    def __init__(self, torch_device: int) -> None:
        import pynvml
        import torch

        pynvml.nvmlInit()
        self._nvml = pynvml
        uuid = str(torch.cuda.get_device_properties(torch_device).uuid)
        uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
        try:
            self._handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
            self.selector = uuid  # what joulegate's `nvml:` meter spec takes
        except pynvml.NVMLError:
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(torch_device)
            self.selector = str(torch_device)
        self.name = pynvml.nvmlDeviceGetName(self._handle)

    def joules(self) -> float:
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1000.0

    def watts(self) -> float:
        return self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0


def gpu_available() -> str | None:
    """Why there is no usable GPU, or None when there is one."""
    try:
        import torch
    except ImportError:
        return "torch is not installed (pip install -e '.[model-server]')"
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:
        return f"NVML is not usable: {exc}"
    return None


# --- real-size random-weight models --------------------------------------------------------------


def build_registry(device: str, dtype: Any, tokenizers_dir: Path) -> Any:
    """All six tasks at real size on ``device``; tokenizers come from the tiny models."""
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer

    from model_server.config import ModelSpec
    from model_server.registry import LoadedModel, ModelRegistry
    from model_server.tasks.embeddings import Embedder
    from model_server.tasks.image_classification import ImageClassifier
    from model_server.tasks.image_generation import ImageGenerator
    from model_server.tasks.summarization import Summarizer
    from model_server.tasks.text_classification import TextClassifier
    from model_server.tasks.text_generation import TextGenerator

    def tok(name: str, max_length: int) -> Any:
        tokenizer = AutoTokenizer.from_pretrained(tokenizers_dir / name)
        tokenizer.model_max_length = max_length
        return tokenizer

    def on_device(build: Callable[[], Any]) -> Any:
        torch.manual_seed(0)
        with torch.device(device):
            return build().to(dtype).eval()

    models = {
        "text-generation": TextGenerator(on_device(gpt2_medium), tok("tiny-gpt2", 1024), device),
        "image-generation": ImageGenerator(sd15_pipeline(device, dtype, tokenizers_dir), device),
        "embeddings": Embedder(on_device(bert_base), tok("tiny-bert-embeddings", 512), device),
        "text-classification": TextClassifier(
            on_device(bert_base_classifier), tok("tiny-bert-sentiment", 512), device
        ),
        "summarization": Summarizer(on_device(t5_small), tok("tiny-t5", 512), device),
        "image-classification": ImageClassifier(
            on_device(vit_base),
            AutoImageProcessor.from_pretrained(
                tokenizers_dir / "tiny-vit", size={"height": 224, "width": 224}
            ),
            device,
        ),
    }
    loaded = []
    for task, runner in models.items():
        spec = ModelSpec(name=MODEL_NAMES[task], task=task, source="random-init", local=False)
        loaded.append(LoadedModel(spec=spec, device=device, runner=runner))
    return ModelRegistry(loaded)


MODEL_NAMES = {
    "text-generation": "random-gpt2-medium",
    "image-generation": "random-sd15",
    "embeddings": "random-bert-base",
    "text-classification": "random-bert-base-classifier",
    "summarization": "random-t5-small",
    "image-classification": "random-vit-base",
}


def gpt2_medium() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=1024, n_layer=24, n_head=16, n_positions=1024))


def _bert_config(**extra: Any) -> Any:
    from transformers import BertConfig

    return BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, **extra)


def bert_base() -> Any:
    from transformers import BertModel

    return BertModel(_bert_config())


def bert_base_classifier() -> Any:
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification(
        _bert_config(
            id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1}
        )
    )


def t5_small() -> Any:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        d_model=512,
        d_kv=64,
        d_ff=2048,
        num_layers=6,
        num_heads=8,
        vocab_size=32128,
        decoder_start_token_id=0,
        task_specific_params={"summarization": {"prefix": "summarize: "}},
    )
    return T5ForConditionalGeneration(config)


def vit_base() -> Any:
    from transformers import ViTConfig, ViTForImageClassification

    labels = {i: f"class_{i}" for i in range(1000)}
    return ViTForImageClassification(ViTConfig(image_size=224, patch_size=16, id2label=labels))


def sd15_unet() -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=(
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        cross_attention_dim=768,
        attention_head_dim=8,
    )


def sd15_vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=2,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=512,
    )


def sd15_text_encoder() -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )


def sd15_pipeline(device: str, dtype: Any, tokenizers_dir: Path) -> Any:
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    torch.manual_seed(0)
    with torch.device(device):
        unet, vae, text_encoder = sd15_unet(), sd15_vae(), sd15_text_encoder()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizers_dir / "tiny-sd" / "tokenizer"),
        unet=unet,
        scheduler=PNDMScheduler(  # SD 1.5's own scheduler settings
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            skip_prk_steps=True,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- the workload ---------------------------------------------------------------------------


def workloads(
    requests: int, image_requests: int, names: dict[str, str], smoke: bool
) -> list[Workload]:
    size, steps, new_tokens = ("32x32", 4, 16) if smoke else ("512x512", 50, 128)
    return [
        Workload(
            "text-generation",
            names["text-generation"],
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": TEXT}],
                "max_tokens": new_tokens,
                "ignore_eos": True,
            },
            requests,
        ),
        Workload(
            "image-generation",
            names["image-generation"],
            "/v1/images/generations",
            {"prompt": "an astronaut riding a horse", "size": size, "num_inference_steps": steps},
            image_requests,
        ),
        Workload(
            "embeddings", names["embeddings"], "/v1/embeddings", {"input": SHORT_TEXT}, requests
        ),
        Workload(
            "text-classification",
            names["text-classification"],
            "/v1/classifications",
            {"input": SHORT_TEXT},
            requests,
        ),
        Workload(
            "summarization",
            names["summarization"],
            "/v1/summarizations",
            {"input": TEXT * 3, "max_tokens": 64, "min_tokens": 64},
            requests,
        ),
        Workload(
            "image-classification",
            names["image-classification"],
            "/v1/image-classifications",
            {"image": _photo_like_png()},
            requests,
        ),
    ]


def _photo_like_png() -> str:
    import torch
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (480, 640, 3), generator=generator, dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


async def measure(
    session: aiohttp.ClientSession,
    proxy: str,
    recorder: Recorder,
    workload: Workload,
    meter: EnergyMeter | None,
    warmup: int,
) -> Measurement:
    """Warm up, then send the requests one after another through joulegate, inside one
    window of NVML's counter; joulegate's own per-request records are read afterwards."""
    body = {"model": workload.model, **workload.body}
    url = proxy + workload.path
    for _ in range(warmup):
        await _post(session, url, body)
    start_j = meter.joules() if meter else 0.0
    started = time.perf_counter()
    usage: dict[str, Any] = {}
    ids = []
    for _ in range(workload.requests):
        usage, request_id = await _post(session, url, body)
        ids.append(request_id)
    elapsed = time.perf_counter() - started
    joules = (meter.joules() - start_j) if meter else None
    while recorder.pending or recorder.in_flight:
        await asyncio.sleep(0.05)
    energies = [getattr(recorder.store.get(i), "energy_joules", None) for i in ids]
    known = [e for e in energies if e is not None]
    return Measurement(
        task=workload.task,
        model=workload.model,
        requests=workload.requests,
        seconds_per_request=elapsed / workload.requests,
        wh_per_request=None if joules is None else joules / 3600.0 / workload.requests,
        joulegate_wh_per_request=sum(known) / len(known) / 3600.0 if known else None,
        usage=usage,
    )


async def _post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    async with session.post(url, json=body) as response:
        answer = await response.json()
        if response.status != 200:
            raise RuntimeError(f"{url}: {response.status} {answer}")
        return answer.get("usage", {}), response.headers["X-Request-Id"]


def report(results: list[Measurement], meter_name: str | None) -> str:
    smoke = "CPU smoke run: joulegate on a synthetic 100 W meter, no NVML window"
    lines = [f"device: {meter_name or smoke}", ""]
    header = (
        f"{'task':<22}{'model':<24}{'req':>4}{'s/req':>8}{'joulegate Wh/req':>18}"
        f"{'NVML window Wh/req':>20}{'diff %':>8}  usage"
    )
    lines += [header, "-" * len(header)]
    for r in results:
        ours = "n/a" if r.joulegate_wh_per_request is None else f"{r.joulegate_wh_per_request:.6f}"
        window = "n/a" if r.wh_per_request is None else f"{r.wh_per_request:.6f}"
        diff = "n/a"
        if r.joulegate_wh_per_request and r.wh_per_request:
            diff = f"{100 * (r.joulegate_wh_per_request / r.wh_per_request - 1):.1f}"
        usage = ", ".join(f"{k}={v}" for k, v in r.usage.items() if isinstance(v, int))
        timing = f"{r.requests:>4}{r.seconds_per_request:>8.3f}{ours:>18}{window:>20}{diff:>8}"
        lines.append(f"{r.task:<22}{r.model:<24}{timing}  {usage}")
    by_task = {r.task: r for r in results}
    image, text = by_task.get("image-generation"), by_task.get("text-generation")
    lines.append("")
    study = study_figures()
    paper = study["image-generation"].kwh_per_1000_mean / study["text-generation"].kwh_per_1000_mean
    if image and text and image.joulegate_wh_per_request and text.joulegate_wh_per_request:
        ratio = image.joulegate_wh_per_request / text.joulegate_wh_per_request
        lines.append(f"image-generation / text-generation energy per request: {ratio:.1f}x")
    elif image and text:
        ratio = image.seconds_per_request / text.seconds_per_request
        lines.append(
            f"image-generation / text-generation time per request: {ratio:.1f}x (no energy)"
        )
    lines.append(f"(Luccioni et al. 2024, averaged over their models: {paper:.0f}x)")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> list[Measurement]:
    from model_server.app import start
    from model_server.config import ServerConfig, load_config
    from model_server.registry import load_registry
    from model_server.tiny import MODELS, build_tiny_models

    with tempfile.TemporaryDirectory(prefix="joulegate-bench-") as tmp:
        tiny_config_path = build_tiny_models(Path(tmp))
        if args.smoke:
            config = load_config(tiny_config_path)
            registry = load_registry(config)
            names = {task: name for name, task, _, _ in MODELS}
            meter = None
        else:
            import torch

            device = "cuda:0"
            registry = build_registry(device, torch.float16, Path(tmp))
            config = ServerConfig(models=tuple(m.spec for m in registry))
            names = MODEL_NAMES
            meter = EnergyMeter(torch.cuda.current_device())
        server = await start(config, models=registry)
        gateway = create_app(
            proxy_config(
                environ={},
                overrides={
                    "upstream": server.url,
                    # the smoke run checks the plumbing with constant power
                    "meter": "synthetic:100" if meter is None else f"nvml:{meter.selector}",
                    "log_level": "warning",
                    "ledger": "off",
                },
            )
        )
        try:
            async with (
                serving(gateway) as proxy,
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session,
            ):
                results = []
                for workload in workloads(args.requests, args.image_requests, names, args.smoke):
                    if args.tasks and workload.task not in args.tasks:
                        continue
                    result = await measure(
                        session, proxy, gateway[RECORDER], workload, meter, args.warmup
                    )
                    print(
                        f"  {workload.task}: {result.seconds_per_request:.3f} s/request", flush=True
                    )
                    results.append(result)
        finally:
            await server.stop()
    print()
    print(report(results, meter.name if meter else None))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10, help="measured requests per task")
    parser.add_argument("--image-requests", type=int, default=3, help="for image generation")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured requests per task")
    parser.add_argument("--tasks", nargs="*", help="only these tasks")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--rows-json", type=Path, help="also write the summary rows here")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny models on the CPU, to check the plumbing"
    )
    args = parser.parse_args(argv)
    if not args.smoke:
        missing = gpu_available()
        if missing:
            print(f"gpu_tasks: no GPU to measure ({missing}); nothing to do.")
            print("Run it on a machine with an NVIDIA GPU, or with --smoke to check the plumbing.")
            row = Row("GPU tasks: Wh per request per task", "-", f"no GPU ({missing})", INFO)
            write_rows(args.rows_json, [row])
            return 0
    results = asyncio.run(run(args))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    write_rows(args.rows_json, summary_rows(results, smoke=args.smoke))
    return 0


def summary_rows(results: list[Measurement], smoke: bool) -> list[Row]:
    """joulegate's Wh per request for each task beside NVML's window (informational: the
    study's figures are for other models and settings)."""
    rows = []
    where = " (CPU smoke run)" if smoke else ""
    for r in results:
        ours = "n/a" if r.joulegate_wh_per_request is None else f"{r.joulegate_wh_per_request:.6f}"
        window = "" if r.wh_per_request is None else f" (NVML window {r.wh_per_request:.6f})"
        rows.append(Row(f"GPU tasks{where}: {r.task} Wh/request", "-", ours + window, INFO))
    return rows


if __name__ == "__main__":
    sys.exit(main())
