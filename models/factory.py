"""Tiny random checkpoints in the exact on-disk layout of the official hub repos.

Tests and the app's demo mode use them: same file names, tensor names, shapes and dtypes, config
keys and tokenizer files as baidu/ERNIE-4.5-0.3B-PT, -21B-A3B-PT and -VL-28B-A3B-PT (and, for the
NLI demo, MoritzLaurer/ernie-m-large-mnli-xnli), only smaller (or, for benchmarks, at the real
sizes). Runtime packages only, deterministic for a given seed.
"""
from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from .chat_template import ERNIE_4_5_CHAT_TEMPLATE
from .ernie_m_tokenizer import DEFAULT_SPECIAL_TOKENS
from .sentencepiece_model import BPE_MODEL, BYTE, CONTROL, NORMAL, UNIGRAM_MODEL, UNKNOWN, USER_DEFINED, Piece
from .sentencepiece_model import SentencePieceModel
from .sentencepiece_model import serialize_model, to_tokenizers

# ---- tokenizer ----------------------------------------------------------------------------------

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>",
                  "cls_token": "<|begin_of_sentence|>", "sep_token": "<|end_of_sentence|>", "mask_token": "<mask:1>"}
EXTRA_SPECIAL_TOKENS = ["<mask:4>", "<mask:5>", "<mask:6>", "<mask:7>"]
# The VL tokenizer's image/video tokens (checkpoints.md §4.4; <|VIDEO_PLACEHOLDER|> is transformers'
# addition, the original processor reuses the image placeholder for video patches).
VL_SPECIAL_TOKENS = ["<|IMAGE_PLACEHOLDER|>", "<|IMAGE_START|>", "<|IMAGE_END|>", "<|VIDEO_START|>",
                     "<|VIDEO_END|>", "<|VIDEO_PLACEHOLDER|>", "<think>", "</think>"]
CORPUS = """\
Hello! How can I help you today? I am a helpful assistant and I answer questions clearly.
The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the capital.
Please write a short poem about the sea, the moon and the stars in the night sky.
def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n
你好！我是文心一言，很高兴为你服务。今天天气很好，我们去公园散步吧。中国的首都是北京。
请用中文回答这个问题：人工智能是什么？人工智能是让机器像人一样思考和学习的技术。
こんにちは。今日はいい天気ですね。日本の首都は東京です。
مرحبا بك! كيف يمكنني مساعدتك اليوم؟ Привет, как дела? Bonjour, comment ça va? ¿Dónde está la biblioteca?
Emoji 😀 🎉 👍 ❤️ and numbers like 2024, 3.14159 and 100% are common in chats.
"""


def _sentencepiece_model(extra_specials: tuple[str, ...]) -> SentencePieceModel:
    """A SentencePiece BPE model with ERNIE's id layout: <unk> <s> </s>, the ten digits as
    user-defined symbols, 256 byte-fallback pieces, BPE pieces learned from CORPUS (no dummy
    prefix, whitespace kept as in ERNIE's tokenizer), then the chat special tokens and
    `extra_specials`."""
    text = CORPUS.replace(" ", "▁")
    trainer = trainers.BpeTrainer(vocab_size=900, min_frequency=2, show_progress=False)
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("▁", "merged_with_next"), pre_tokenizers.Digits(individual_digits=True)]
    )
    learner.train_from_iterator(text.splitlines(), trainer)
    merged = [left + right for left, right in json.loads(learner.to_str())["model"]["merges"]]
    chars = sorted({c for c in text if not c.isdigit() and c != "\n"} | {"▁"})
    pieces = [Piece("<unk>", 0, UNKNOWN), Piece("<s>", 0, CONTROL), Piece("</s>", 0, CONTROL)]
    pieces += [Piece(str(d), 0, USER_DEFINED) for d in range(10)]
    pieces += [Piece(f"<0x{b:02X}>", 0, BYTE) for b in range(256)]
    normal = list(dict.fromkeys(p for p in merged if not any(c.isdigit() for c in p)))
    normal += [c for c in chars if c not in normal]
    pieces += [Piece(p, -float(i), NORMAL) for i, p in enumerate(normal)]
    specials = [SPECIAL_TOKENS["cls_token"], SPECIAL_TOKENS["sep_token"], SPECIAL_TOKENS["mask_token"],
                *EXTRA_SPECIAL_TOKENS, *extra_specials]
    pieces += [Piece(p, 0, CONTROL) for p in specials]
    return SentencePieceModel(pieces, model_type=BPE_MODEL, byte_fallback=True, add_dummy_prefix=False,
                              remove_extra_whitespaces=False, normalizer_name="identity")


@lru_cache(maxsize=2)
def _tokenizer_files(extra_specials: tuple[str, ...]) -> dict[str, bytes]:
    spm = _sentencepiece_model(extra_specials)
    ids = {p.piece: i for i, p in enumerate(spm.pieces)}
    special = [p.piece for p in spm.pieces if p.type in (CONTROL, UNKNOWN)]
    decoder = {
        str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        for t in special
    }
    config = {
        "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False, "legacy": True,
        "added_tokens_decoder": decoder, **SPECIAL_TOKENS, "additional_special_tokens": [*EXTRA_SPECIAL_TOKENS, *extra_specials],
        "chat_template": ERNIE_4_5_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "model_max_length": 131072, "sp_model_kwargs": {}, "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer", "use_default_system_prompt": False,
    }
    special_map = {**SPECIAL_TOKENS, "additional_special_tokens": [*EXTRA_SPECIAL_TOKENS, *extra_specials]}
    return {
        "tokenizer.model": serialize_model(spm),
        "tokenizer.json": to_tokenizers(spm).to_str(pretty=True).encode(),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False).encode(),
        "special_tokens_map.json": json.dumps(special_map, indent=2).encode(),
    }


def write_tokenizer_files(directory: str | Path, vl: bool = False) -> None:
    """tokenizer.model, tokenizer.json, tokenizer_config.json (with the chat template) and
    special_tokens_map.json, as in the hub's ERNIE 4.5 text repos; `vl` adds the VL repo's
    image/video special tokens (after all others, ids from 501)."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in _tokenizer_files(tuple(VL_SPECIAL_TOKENS) if vl else ()).items():
        (folder / name).write_bytes(data)

# ---- model --------------------------------------------------------------------------------------

TINY_VOCAB_SIZE = 512  # the factory tokenizer's 501 tokens, padded like the real 103424 > 101304

# The official config.json of baidu/ERNIE-4.5-0.3B-PT and baidu/ERNIE-4.5-21B-A3B-PT (hub format:
# top-level rope_theta, torch_dtype; see shared/reference/checkpoints.md §2.1, §3.1).
ERNIE_0_3B_CONFIG: dict = {
    "architectures": ["Ernie4_5ForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "hidden_act": "silu",
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "max_position_embeddings": 131072,
    "model_type": "ernie4_5",
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "num_hidden_layers": 18,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_bias": False,
    "use_cache": False,
    "vocab_size": 103424,
}
ERNIE_21B_A3B_CONFIG: dict = {
    **{k: v for k, v in ERNIE_0_3B_CONFIG.items() if k != "head_dim"},
    "architectures": ["Ernie4_5_MoeForCausalLM"],
    "model_type": "ernie4_5_moe",
    "hidden_size": 2560,
    "intermediate_size": 12288,
    "num_attention_heads": 20,
    "num_key_value_heads": 4,
    "num_hidden_layers": 28,
    "moe_num_experts": 64,
    "moe_k": 6,
    "moe_intermediate_size": 1536,
    "moe_num_shared_experts": 2,
    "moe_layer_start_index": 1,
    "moe_layer_end_index": 27,
    "moe_layer_interval": 1,
    "moe_use_aux_free": True,
    "moe_capacity": [64, 64, 64],
    "moe_gate": "topk",
    "num_nextn_predict_layers": 1,
}
# The original config.json of baidu/ERNIE-4.5-VL-28B-A3B-PT (flat text keys, list-valued MoE keys
# for the text and vision experts; checkpoints.md §4.1). Its special token ids are the VL
# tokenizer's fixed ones (101304 ... for image/video start/end).
ERNIE_VL_28B_A3B_CONFIG: dict = {
    **{k: v for k, v in ERNIE_0_3B_CONFIG.items() if k != "head_dim"},
    "architectures": ["Ernie4_5_VLMoeForConditionalGeneration"],
    "model_type": "ernie4_5_moe_vl",
    "hidden_size": 2560,
    "intermediate_size": 12288,
    "num_attention_heads": 20,
    "num_key_value_heads": 4,
    "num_hidden_layers": 28,
    "moe_num_experts": [64, 64],
    "moe_intermediate_size": [1536, 512],
    "moe_k": 6,
    "moe_num_shared_experts": 2,
    "moe_layer_start_index": [1, 1],
    "moe_layer_end_index": [29, 28],
    "moe_layer_interval": 1,
    "moe_use_aux_free": True,
    "im_patch_id": 100295,
    "pixel_hidden_size": 1280,
    "spatial_conv_size": 2,
    "temporal_conv_size": 2,
    "use_temporal_conv": True,
    "rope_3d": True,
    "freq_allocation": 20,
    "vision_config": {
        "depth": 32, "embed_dim": 1280, "hidden_size": 1280, "num_heads": 16, "mlp_ratio": 4,
        "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "hidden_act": "quick_gelu",
    },
}
# generation_config.json of the 0.3B checkpoints (checkpoints.md §2.5).
GENERATION_CONFIG: dict = {
    "do_sample": True,
    "top_p": 0.8,
    "temperature": 0.8,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "repetition_penalty": 1.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
}
TINY_DIMS: dict = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "max_position_embeddings": 4096,
}


def tiny_config(kind: str, **overrides: Any) -> dict:
    """A small config.json in the official format of the dense ("dense"), MoE ("moe") or
    vision-language ("vl") model."""
    if kind == "dense":
        config = {**ERNIE_0_3B_CONFIG, **TINY_DIMS, "head_dim": 32}
    elif kind == "moe":
        config = {**ERNIE_21B_A3B_CONFIG, **TINY_DIMS, "num_hidden_layers": 3, "moe_num_experts": 8,
                  "moe_k": 2, "moe_intermediate_size": 32, "moe_layer_end_index": 2}
    elif kind == "vl":
        # Head dim 16: 8 rotary frequencies, the last 2 for time. The image/video token ids of the
        # tiny tokenizer are given explicitly (the real config relies on the fixed ones).
        ids = {token: 501 + i for i, token in enumerate(VL_SPECIAL_TOKENS)}
        config = {
            **ERNIE_VL_28B_A3B_CONFIG, **TINY_DIMS, "num_hidden_layers": 3, "moe_num_experts": [8, 8],
            "moe_k": 2, "moe_intermediate_size": [32, 16], "freq_allocation": 2, "pixel_hidden_size": 32,
            "vision_config": {**ERNIE_VL_28B_A3B_CONFIG["vision_config"], "depth": 2, "embed_dim": 32,
                              "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2},
            "im_patch_id": ids["<|IMAGE_PLACEHOLDER|>"],
            "image_start_token_id": ids["<|IMAGE_START|>"], "image_end_token_id": ids["<|IMAGE_END|>"],
            "video_start_token_id": ids["<|VIDEO_START|>"], "video_end_token_id": ids["<|VIDEO_END|>"],
            "video_token_id": ids["<|VIDEO_PLACEHOLDER|>"],
        }
    else:
        raise ValueError(f"unknown kind {kind!r}: 'dense', 'moe' or 'vl'")
    return {**config, "vocab_size": TINY_VOCAB_SIZE, **overrides}


def checkpoint_tensors(config: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor the official files of `config` hold: the model's own
    tensors (routers and correction biases in fp32) plus the MTP head when the config declares one."""
    from .loader import model_class

    dtype = getattr(torch, config.get("torch_dtype", "bfloat16"))
    cls = model_class(config)
    with torch.device("meta"):
        model = cls(cls.config_class.from_dict(config)).cast(dtype)
    tensors = {name: (tuple(t.shape), t.dtype) for name, t in model.checkpoint_targets().items()}
    d = config["hidden_size"]
    for i in range(config.get("num_nextn_predict_layers", 0)):
        tensors[f"model.mtp_emb_norm.{i}.weight"] = ((d,), dtype)
        tensors[f"model.mtp_hidden_norm.{i}.weight"] = ((d,), dtype)
        tensors[f"model.mtp_linear_proj.{i}.weight"] = ((d, 2 * d), dtype)
        layer = {k: v for k, v in tensors.items() if k.startswith("model.layers.0.")}
        for name, spec in layer.items():
            tensors[name.replace("model.layers.0.", f"model.mtp_block.{i}.")] = spec
    return tensors


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Random weights with enough spread that greedy decoding has no near-ties."""
    noise = torch.randn(shape, generator=generator)
    if "norm" in name:
        return (1 + 0.1 * noise).to(dtype)
    if "e_score_correction_bias" in name:
        return (0.05 * noise).to(dtype)
    return (noise * shape[-1] ** -0.5).to(dtype)


def write_checkpoint(
    directory: str | Path,
    config: dict,
    *,
    seed: int = 0,
    max_shard_bytes: int | None = None,
    tokenizer: bool = True,
) -> Path:
    """Write a random checkpoint of `config` as the hub publishes it: config.json,
    generation_config.json, model.safetensors (or model-0000i-of-0000n.safetensors plus
    model.safetensors.index.json when it exceeds `max_shard_bytes`) and the tokenizer files.
    The dtype on disk is the config's `torch_dtype`."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    specs = checkpoint_tensors(config)
    shards: list[list[str]] = [[]]
    size = 0
    for name, (shape, dtype) in sorted(specs.items()):
        nbytes = math.prod(shape) * dtype.itemsize
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, names in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: random_tensor(name, *specs[name], generator) for name in names}
        save_file(tensors, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    if len(shards) > 1:
        total = sum(math.prod(shape) * dtype.itemsize for shape, dtype in specs.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if tokenizer:
        write_tokenizer_files(folder, vl="vision_config" in config)
    return folder


# ---- ErnieM NLI classifier ----------------------------------------------------------------------

# config.json of MoritzLaurer/ernie-m-large-mnli-xnli as transformers writes it (checkpoints.md §5.1;
# sizes and labels from the reference config and the model card).
ERNIE_M_LARGE_NLI_CONFIG: dict = {
    "act_dropout": 0.0,
    "architectures": ["ErnieMForSequenceClassification"],
    "attention_probs_dropout_prob": 0.1,
    "classifier_dropout": None,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 1024,
    "id2label": {"0": "entailment", "1": "neutral", "2": "contradiction"},
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "label2id": {"contradiction": 2, "entailment": 0, "neutral": 1},
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 514,
    "model_type": "ernie_m",
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "pad_token_id": 1,
    "problem_type": "single_label_classification",
    "torch_dtype": "float32",
    "vocab_size": 250002,
}


@lru_cache(maxsize=1)
def _ernie_m_tokenizer_files() -> dict[str, bytes]:
    """A unigram sentencepiece.bpe.model learned from CORPUS (<unk> <s> </s> first, as in XLM-R's)
    and vocab.txt in ErnieM's layout: [CLS] [PAD] [SEP] [UNK], the pieces after the first three
    (so a piece's line is its SentencePiece id + 1), then [MASK]."""
    learner = Tokenizer(models.Unigram())
    learner.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=["<unk>"], unk_token="<unk>", show_progress=False)
    learner.train_from_iterator(CORPUS.splitlines(), trainer)
    learned = [(p, score) for p, score in json.loads(learner.to_str())["model"]["vocab"] if p != "<unk>"]
    pieces = [Piece("<unk>", 0, UNKNOWN), Piece("<s>", 0, CONTROL), Piece("</s>", 0, CONTROL)]
    pieces += [Piece(p, score, NORMAL) for p, score in learned]
    spm = SentencePieceModel(pieces, model_type=UNIGRAM_MODEL, normalizer_name="identity")
    vocab = ["[CLS]", "[PAD]", "[SEP]", "[UNK]", *(p.piece for p in pieces[3:]), "[MASK]"]
    config = {"do_lower_case": False, "model_max_length": 512, "tokenizer_class": "ErnieMTokenizer", **DEFAULT_SPECIAL_TOKENS}
    return {
        "sentencepiece.bpe.model": serialize_model(spm),
        "vocab.txt": "".join(f"{token}\n" for token in vocab).encode(),
        "tokenizer_config.json": json.dumps(config, indent=2).encode(),
        "special_tokens_map.json": json.dumps(DEFAULT_SPECIAL_TOKENS, indent=2).encode(),
    }


def tiny_ernie_m_config(**overrides: Any) -> dict:
    """A small config.json in the format of the ErnieM NLI checkpoint, sized to the factory vocab."""
    vocab_size = len(_ernie_m_tokenizer_files()["vocab.txt"].decode().splitlines())
    dims = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2}
    return {**ERNIE_M_LARGE_NLI_CONFIG, **dims, "vocab_size": vocab_size, **overrides}


def write_ernie_m_checkpoint(directory: str | Path, config: dict | None = None, *, seed: int = 0) -> Path:
    """A random ErnieM classifier as the hub's ErnieM repos publish it: config.json,
    pytorch_model.bin (the encoder under `ernie_m.`, then `classifier.`), vocab.txt,
    sentencepiece.bpe.model, tokenizer_config.json and special_tokens_map.json."""
    from .ernie_m import ErnieMConfig, ErnieMForSequenceClassification

    config = config or tiny_ernie_m_config()
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    with torch.device("meta"):
        model = ErnieMForSequenceClassification(ErnieMConfig.from_dict(config))
    generator = torch.Generator().manual_seed(seed)
    # Our module names are the hub's tensor names (the encoder under `ernie_m.`).
    tensors = {name: random_tensor(name, tuple(t.shape), torch.float32, generator) for name, t in model.named_parameters()}
    torch.save(tensors, folder / "pytorch_model.bin")
    for name, data in _ernie_m_tokenizer_files().items():
        (folder / name).write_bytes(data)
    return folder


# ---- ERNIE 4.5 VL processor files -----------------------------------------------------------------

# The shape of the HF v5 VL chat template (architecture.md §4.5; our own text, not the hub's): `User: ` + parts without separators,
# numbered Picture / Video markers, a closed think block unless enable_thinking.
VL_TEMPLATE = """\
{%- set count = namespace(image=0, video=0) -%}
{{- '<|begin_of_sentence|>' -}}
{%- for message in messages -%}
  {%- if message.role in ['system', 'user'] -%}
    {%- if message.role == 'user' %}User: {% endif -%}
    {%- if message.content is string -%}{{ message.content }}
    {%- else -%}
      {%- for part in message.content -%}
        {%- if part.type == 'text' -%}{{ part.text }}
        {%- elif part.type in ['image', 'image_url'] -%}
          {%- set count.image = count.image + 1 -%}
          Picture {{ count.image }}:<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>
        {%- elif part.type in ['video', 'video_url'] -%}
          {%- set count.video = count.video + 1 -%}
          Video {{ count.video }}:<|VIDEO_START|><|VIDEO_PLACEHOLDER|><|VIDEO_END|>
        {%- endif -%}
      {%- endfor -%}
    {%- endif -%}
    {%- if message.role == 'system' %}{{ '\\n' }}{% endif -%}
  {%- elif message.role == 'assistant' -%}
    {{- '\\nAssistant: ' + message.content + '<|end_of_sentence|>' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '\\nAssistant: ' -}}
  {{- '<think>' if (enable_thinking is defined and enable_thinking) else '<think>\\n\\n</think>\\n\\n' -}}
{%- endif -%}"""

VL_FONT_NAME = "Roboto-Regular.ttf"


def write_vl_processor_files(folder: str | Path, nested: bool = False) -> Path:
    """The processor side of a VL repo: image and video processor configs (per-processor files,
    or v5's nested processor_config.json) with the values transformers writes for the real
    checkpoint, a TrueType font standing in for its Roboto (Pillow's bundled one), and the VL chat
    template plus token names in tokenizer_config.json."""
    from PIL import ImageFont

    from .ernie4_5_vl_processor import TOKENS

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / VL_FONT_NAME).write_bytes(ImageFont.load_default(10).path.getvalue())
    clip = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
            "rescale_factor": 1 / 255, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
            "resample": 3, "patch_size": 14, "merge_size": 2}
    image = {**clip, "image_processor_type": "Ernie4_5_VLMoeImageProcessor", "temporal_patch_size": 1,
             "size": {"shortest_edge": 56 * 56, "longest_edge": 6177 * 28 * 28}}
    video = {**clip, "video_processor_type": "Ernie4_5_VLMoeVideoProcessor", "temporal_patch_size": 2,
             "size": {"shortest_edge": 299 * 28 * 28, "longest_edge": 1196 * 28 * 28}, "min_frames": 16,
             "max_frames": 180, "do_sample_frames": True, "draw_on_frames": True, "font": VL_FONT_NAME, "fps": None}
    if nested:
        (folder / "processor_config.json").write_text(json.dumps({"image_processor": image, "video_processor": video}))
    else:
        (folder / "preprocessor_config.json").write_text(json.dumps(image))
        (folder / "video_preprocessor_config.json").write_text(json.dumps(video))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config.update(TOKENS, chat_template=VL_TEMPLATE)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return folder
