"""ErnieM, the multilingual encoder, with its sequence-classification head and zero-shot NLI.

A post-LayerNorm BERT-style encoder: word + absolute position embeddings (positions start at 2, as
in PaddleNLP), multi-head self-attention over the unpadded tokens, GELU feed-forward, and a tanh
pooler over the first token. Module and parameter names follow the hub checkpoints
(MoritzLaurer/ernie-m-large-mnli-xnli, susnato/ernie-m-base_pytorch), so tensors load by name.
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .ernie_m_tokenizer import ErnieMTokenizer

POSITION_OFFSET = 2
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class ErnieMConfig:
    """The config.json keys the forward pass depends on, with the reference's defaults."""

    vocab_size: int = 250002
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 514
    pad_token_id: int = 1
    layer_norm_eps: float = 1e-5
    id2label: dict[int, str] = field(default_factory=lambda: {0: "LABEL_0", 1: "LABEL_1"})
    label2id: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ErnieMConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known and v is not None}
        if "id2label" in values:
            values["id2label"] = {int(i): label for i, label in values["id2label"].items()}
        config = cls(**values)
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r}")
        if not config.label2id:
            config.label2id = {label: i for i, label in config.id2label.items()}
        return config

    @property
    def num_labels(self) -> int:
        return len(self.id2label)


class Embeddings(nn.Module):
    def __init__(self, config: ErnieMConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device) + POSITION_OFFSET
        return self.layer_norm(self.word_embeddings(input_ids) + self.position_embeddings(positions))


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention; `bias` [B, 1, 1, T] is added to the scores."""

    def __init__(self, config: ErnieMConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.self_attn = nn.ModuleDict({name: nn.Linear(d, d) for name in ("q_proj", "k_proj", "v_proj")})
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = (proj(x).view(B, T, self.num_heads, -1).transpose(1, 2) for proj in self.self_attn.values())
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, d))


class EncoderLayer(nn.Module):
    """Post-LN: x = norm1(x + attn(x)); x = norm2(x + linear2(act(linear1(x))))."""

    def __init__(self, config: ErnieMConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.self_attn = SelfAttention(config)
        self.linear1 = nn.Linear(d, config.intermediate_size)
        self.linear2 = nn.Linear(config.intermediate_size, d)
        self.norm1 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.norm2 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.self_attn(x, bias))
        return self.norm2(x + self.linear2(self.act(self.linear1(x))))


class Encoder(nn.Module):
    def __init__(self, config: ErnieMConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))


class Pooler(nn.Module):
    def __init__(self, config: ErnieMConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class EncoderOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # [B, T, d]
    pooler_output: torch.Tensor  # [B, d]


class _Checkpoint(nn.Module):
    """What the loader needs of an ErnieM model. Task checkpoints store the encoder under the
    `ernie_m.` prefix, base ones without it: either layout loads."""

    config_class = ErnieMConfig
    config: ErnieMConfig

    def checkpoint_targets(self, names: Collection[str] = ()) -> dict[str, torch.Tensor]:
        """The parameters keyed as a file with tensors `names` stores them: the encoder's under
        `ernie_m.` when that file uses the prefix, bare otherwise; the head's as `classifier.`."""
        prefix = "ernie_m." if any(n.startswith("ernie_m.") for n in names) else ""
        targets = {}
        for name, tensor in self.named_parameters():
            bare = name.removeprefix("ernie_m.")
            targets[bare if bare.startswith("classifier.") else prefix + bare] = tensor
        return targets

    def ignores_checkpoint_key(self, name: str) -> bool:
        return False

    def may_miss_checkpoint_key(self, name: str) -> bool:
        return False

    def cast(self, dtype: torch.dtype) -> _Checkpoint:
        return self.to(dtype)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


class ErnieMModel(_Checkpoint):
    """The encoder: `forward(ids, attention_mask)` -> (last_hidden_state, pooler_output)."""

    def __init__(self, config: ErnieMConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.pooler = Pooler(config)

    def ignores_checkpoint_key(self, name: str) -> bool:
        """The encoder alone loads from a task checkpoint, without its head."""
        return name.startswith("classifier.")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> EncoderOutput:
        """`attention_mask` [B, T] is 1 for real tokens; without one, pad-id tokens are masked
        (as the reference does)."""
        keep = input_ids != self.config.pad_token_id if attention_mask is None else attention_mask.bool()
        x = self.embeddings(input_ids)
        # The reference adds finfo.min to masked scores (not -inf): a fully masked row stays finite.
        bias = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, torch.finfo(x.dtype).min)
        bias = bias[:, None, None, :]
        for layer in self.encoder.layers:
            x = layer(x, bias)
        return EncoderOutput(x, self.pooler(x))


class ErnieMForSequenceClassification(_Checkpoint):
    """Encoder plus a linear head on the pooled output: `forward(ids, attention_mask)` -> logits [B, num_labels]."""

    def __init__(self, config: ErnieMConfig) -> None:
        super().__init__()
        self.config = config
        self.ernie_m = ErnieMModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.ernie_m(input_ids, attention_mask).pooler_output)


# ---- zero-shot classification -------------------------------------------------------------------

DEFAULT_HYPOTHESIS_TEMPLATE = "This example is {}."


@dataclass
class ZeroShotResult:
    sequence: str
    labels: list[str]  # best first
    scores: list[float]
    truncated: bool  # the text was cut to fit the model


def nli_label_ids(config: ErnieMConfig) -> tuple[int, int]:
    """(entailment, contradiction) logit indices, found as transformers' pipeline finds them: the
    first label whose name starts with "entail"; contradiction is the last logit when entailment
    is the first, else the first."""
    entailment = next((i for label, i in config.label2id.items() if label.lower().startswith("entail")), None)
    if entailment is None:
        raise ValueError(f"not an NLI model: no label starts with 'entail' in {config.id2label}")
    return entailment, config.num_labels - 1 if entailment == 0 else 0


@torch.no_grad()
def zero_shot_classify(
    model: ErnieMForSequenceClassification,
    tokenizer: ErnieMTokenizer,
    text: str,
    labels: list[str],
    hypothesis_template: str = DEFAULT_HYPOTHESIS_TEMPLATE,
    multi_label: bool = False,
) -> ZeroShotResult:
    """Score `labels` for `text` with an NLI model, as transformers' zero-shot-classification
    pipeline does: premise = text, hypothesis = the template filled with a label; one padded
    batch for all labels. Single-label scores are a softmax over labels of the entailment logits;
    multi-label (or a single label) scores are per label the entailment probability of the softmax
    over (contradiction, entailment). The text is cut to what the model takes (`truncated` says so)."""
    if not labels:
        raise ValueError("no candidate labels")
    entailment, contradiction = nli_label_ids(model.config)
    limit = min(tokenizer.model_max_length, model.config.max_position_embeddings - POSITION_OFFSET)
    encoded = [tokenizer.encode_truncated(text, hypothesis_template.format(label), limit) for label in labels]
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(labels), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(labels), width), dtype=torch.long)
    for row, (row_ids, _) in enumerate(encoded):
        ids[row, : len(row_ids)] = torch.tensor(row_ids)
        mask[row, : len(row_ids)] = 1
    logits = model(ids.to(model.device), attention_mask=mask.to(model.device)).float().cpu()
    if multi_label or len(labels) == 1:
        scores = logits[:, [contradiction, entailment]].softmax(-1)[:, 1]
    else:
        scores = logits[:, entailment].softmax(0)
    order = scores.argsort(descending=True, stable=True).tolist()
    return ZeroShotResult(text, [labels[i] for i in order], [scores[i].item() for i in order], encoded[0][1])
