"""Tiny random-weight models for every task, built offline in seconds.

They exist so that the server, joulegate's demo and the tests run anywhere, with no network
and no GPU: every model and tokenizer is built from a config (weights from a fixed seed),
saved with ``save_pretrained`` and served through the same ``from_pretrained`` code path as
a real checkpoint. Their outputs are gibberish; their shapes, token counts and timings are
real. ``build_tiny_models`` also writes a config YAML beside them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

TINY_VERSION = 1
CONFIG_NAME = "model-server.yaml"
SEED = 1234

# A few sentences to train the tiny tokenizers on: enough for merges, small enough to be quick.
SENTENCES: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Energy per request is measured in joules and reported in watt-hours.",
    "A reverse proxy meters every inference request by task, model and tenant.",
    "Image generation uses far more energy than text classification.",
    "Hello! How are you today? I am fine, thank you.",
    "Summarize the following text in one short sentence.",
    "The GPU draws power while the model generates tokens one by one.",
    "Grid carbon intensity changes with the weather and the time of day.",
    "def main():\n    print('hello, world')\n",
    "Numbers like 0, 1, 2, 3, 42 and 2024 appear in text too.",
)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# name, task, directory, request defaults
MODELS: tuple[tuple[str, str, str, dict[str, object]], ...] = (
    ("tiny-gpt2", "text-generation", "tiny-gpt2", {}),
    ("tiny-sd", "image-generation", "tiny-sd", {"num_inference_steps": 4, "guidance_scale": 5.0}),
    ("tiny-bert-embeddings", "embeddings", "tiny-bert-embeddings", {}),
    ("tiny-bert-sentiment", "text-classification", "tiny-bert-sentiment", {}),
    ("tiny-t5", "summarization", "tiny-t5", {"max_tokens": 16}),
    ("tiny-vit", "image-classification", "tiny-vit", {}),
)


def default_cache_dir() -> Path:
    """``$JOULEGATE_TINY_MODELS``, else ``~/.cache/joulegate/tiny-models/v<N>``."""
    override = os.environ.get("JOULEGATE_TINY_MODELS")
    if override:
        return Path(override).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "joulegate" / "tiny-models" / f"v{TINY_VERSION}"


def ensure_tiny_models(directory: Path | None = None) -> Path:
    """The tiny models' config file, building the models first if they are missing.

    Builds into a temporary sibling and renames it into place, so a build that is interrupted
    or racing another process never leaves a half-written directory behind.
    """
    directory = directory or default_cache_dir()
    config = directory / CONFIG_NAME
    if config.is_file():
        return config
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=directory.parent))
    try:
        build_tiny_models(staging)
        try:
            staging.rename(directory)
        except OSError:
            if not config.is_file():  # not a concurrent build that won: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return config


def build_tiny_models(directory: Path) -> Path:
    """Build every tiny model under ``directory`` and write its config; returns the config."""
    from model_server.tasks.loading import quiet_progress_bars

    quiet_progress_bars()
    directory.mkdir(parents=True, exist_ok=True)
    builders: dict[str, Callable[[Path], None]] = {
        "text-generation": _build_causal_lm,
        "image-generation": _build_diffusion,
        "embeddings": _build_encoder,
        "text-classification": _build_sequence_classifier,
        "summarization": _build_seq2seq,
        "image-classification": _build_vit,
    }
    entries = []
    for name, task, subdir, defaults in MODELS:
        torch.manual_seed(SEED)
        builders[task](directory / subdir)
        entry: dict[str, object] = {"name": name, "task": task, "path": f"./{subdir}"}
        if defaults:
            entry["defaults"] = defaults
        entries.append(entry)
    config = directory / CONFIG_NAME
    header = "# Tiny random-weight models built by `joulegate-model-server make-tiny`.\n"
    body = yaml.safe_dump({"queue_size": 16, "models": entries}, sort_keys=False)
    config.write_text(header + body, encoding="utf-8")
    return config


def _byte_level_bpe(vocab_size: int, special: list[str]):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SENTENCES, trainer)
    return tokenizer


def _build_causal_lm(path: Path) -> None:
    """GPT-2 shaped: byte-level BPE (any text encodes), a ChatML-style chat template."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    end = "<|endoftext|>"
    backend = _byte_level_bpe(400, [end, "<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=end, eos_token=end, unk_token=end, pad_token=end
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 512
    tokenizer.save_pretrained(path)
    end_id = tokenizer.convert_tokens_to_ids(end)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=512,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=end_id,
        eos_token_id=end_id,
    )
    GPT2LMHeadModel(config).save_pretrained(path)


def _clip_tokenizer():  # -> transformers.CLIPTokenizer
    """CLIP's BPE with only its base vocabulary (bytes, and bytes ending a word): no merges."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    alphabet = sorted(ByteLevel.alphabet())
    for symbol in alphabet + [a + "</w>" for a in alphabet]:
        vocab.setdefault(symbol, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _build_diffusion(path: Path) -> None:
    """Stable Diffusion shaped: UNet, VAE, CLIP text encoder, DDIM; a few hundred kB."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _clip_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)


def _wordpiece_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """BERT-style: lower-cased WordPiece with [CLS] ... [SEP] around every input."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=special, show_progress=False)
    backend.train_from_iterator(SENTENCES, trainer)
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    )


def _bert_config(vocab_size: int, **labels: object):  # -> transformers.BertConfig
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        **labels,
    )


def _build_encoder(path: Path) -> None:
    from transformers import BertModel

    tokenizer = _wordpiece_tokenizer()
    tokenizer.save_pretrained(path)
    BertModel(_bert_config(len(tokenizer))).save_pretrained(path)


def _build_sequence_classifier(path: Path) -> None:
    from transformers import BertForSequenceClassification

    tokenizer = _wordpiece_tokenizer()
    tokenizer.save_pretrained(path)
    labels = {"id2label": {0: "negative", 1: "positive"}}
    labels["label2id"] = {"negative": 0, "positive": 1}
    model = BertForSequenceClassification(_bert_config(len(tokenizer), **labels))
    model.save_pretrained(path)


def _build_seq2seq(path: Path) -> None:
    """T5 shaped, with a Unigram tokenizer (as T5's SentencePiece) that appends ``</s>``."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    backend = Tokenizer(models.Unigram())
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    backend.train_from_iterator(SENTENCES * 4, trainer)
    eos_id = backend.token_to_id("</s>")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=256,
    )
    tokenizer.save_pretrained(path)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        task_specific_params={"summarization": {"prefix": "summarize: "}},
        initializer_factor=5.0,  # the default init makes a tiny T5 emit only padding
    )
    T5ForConditionalGeneration(config).save_pretrained(path)


def _build_vit(path: Path) -> None:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    labels = ["cat", "dog", "teapot"]
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
