"""ERNIE model family in plain PyTorch, loading the official hub checkpoints (no transformers)."""
from .ernie4_5 import Ernie45Config, Ernie45ForCausalLM
from .ernie4_5_vl import Ernie45VLConfig, Ernie45VLForConditionalGeneration
from .generation import generate, sample_token
from .layers import KVCache
from .loader import CheckpointError, load_model
from .tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "CheckpointError",
    "Ernie45Config",
    "Ernie45ForCausalLM",
    "Ernie45VLConfig",
    "Ernie45VLForConditionalGeneration",
    "KVCache",
    "Tokenizer",
    "generate",
    "load_model",
    "load_tokenizer",
    "sample_token",
]
