"""ERNIE model family in plain PyTorch, loading the official hub checkpoints (no transformers)."""
from .ernie4_5 import Ernie45Config, Ernie45ForCausalLM
from .generation import generate, sample_token
from .layers import KVCache
from .loader import CheckpointError, load_model

__all__ = [
    "CheckpointError",
    "Ernie45Config",
    "Ernie45ForCausalLM",
    "KVCache",
    "generate",
    "load_model",
    "sample_token",
]
