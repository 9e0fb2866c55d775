"""ERNIE 4.5 (dense, MoE, VL) and ErnieM in plain PyTorch, loading the official hub checkpoints (no transformers)."""
import os

# torch's CPU matmuls (oneDNN) cache every shape they meet, twice (ideep's LRU_CACHE_CAPACITY and
# oneDNN's primitive cache, 1,024 entries each, ~0.26 MiB an entry); prompts and batched steps of
# ever new lengths fill them to ~540 MiB. 128 keeps the decode steps' shapes and bounds them to
# ~70 MiB. Read at the first matmul: a value set before that wins.
os.environ.setdefault("LRU_CACHE_CAPACITY", "128")
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128")

from .batching import BatchGenerator
from .ernie4_5 import Ernie45Config, Ernie45ForCausalLM
from .ernie4_5_vl import Ernie45VLConfig, Ernie45VLForConditionalGeneration
from .ernie4_5_vl_processor import Ernie45VLProcessor, load_processor
from .ernie_m import ErnieMConfig, ErnieMForSequenceClassification, ErnieMModel, ZeroShotResult, zero_shot_classify
from .ernie_m_tokenizer import ErnieMTokenizer
from .generation import generate, sample_token
from .layers import KVCache
from .loader import CheckpointError, load_model
from .tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "BatchGenerator",
    "CheckpointError",
    "Ernie45Config",
    "Ernie45ForCausalLM",
    "Ernie45VLConfig",
    "Ernie45VLForConditionalGeneration",
    "Ernie45VLProcessor",
    "ErnieMConfig",
    "ErnieMForSequenceClassification",
    "ErnieMModel",
    "ErnieMTokenizer",
    "KVCache",
    "Tokenizer",
    "ZeroShotResult",
    "generate",
    "load_model",
    "load_processor",
    "load_tokenizer",
    "sample_token",
    "zero_shot_classify",
]
