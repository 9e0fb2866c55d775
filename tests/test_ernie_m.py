"""Parity of our ErnieM encoder, classifier and zero-shot scoring with transformers 4.56.2.

The checkpoints are written by the reference's own `save_pretrained` (safetensors and
pytorch_model.bin), its outputs computed in its venv (see ernie_m_reference.py)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import models.hub
from models import CheckpointError, ErnieMForSequenceClassification, ErnieMModel, load_model, load_tokenizer, zero_shot_classify
from models.ernie_m import nli_label_ids
from models.factory import write_ernie_m_checkpoint

ATOL = 1e-5


@pytest.fixture(scope="module")
def reference(ernie_m_reference):
    spec, result, out = ernie_m_reference
    return spec, result, load_file(out / "outputs.safetensors")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("layout", [0, 1], ids=["safetensors", "bin"])
@pytest.mark.parametrize("name", ["nli", "nli_last"])
def test_classifier_matches_reference_on_a_padded_batch(reference, name, layout):
    spec, result, outputs = reference
    folder = result["models"][name]["folders"][layout]
    assert (Path(folder) / ("model.safetensors", "pytorch_model.bin")[layout]).is_file()
    model = load_model(folder, device="cpu", dtype=torch.float32)
    assert isinstance(model, ErnieMForSequenceClassification)
    ids, mask = outputs[f"{name}.input_ids"], outputs[f"{name}.attention_mask"]
    assert (mask == 0).any() and (mask == 1).all(dim=1).any()  # padded rows and a full one
    with torch.no_grad():
        logits = model(ids, attention_mask=mask)
        hidden, pooled = model.ernie_m(ids, attention_mask=mask)
    assert logits.shape == (ids.shape[0], 3)
    assert max_diff(logits, outputs[f"{name}.logits"]) < ATOL
    assert max_diff(hidden, outputs[f"{name}.hidden"]) < ATOL
    assert max_diff(pooled, outputs[f"{name}.pooled"]) < ATOL
    assert model.config.id2label == spec["models"][name]["id2label"]


def test_encoder_without_prefix_and_without_mask(reference):
    """The encoder checkpoint (no `ernie_m.` prefix) loads as ErnieMModel; without a mask, pad ids
    are masked as the reference does."""
    _, result, outputs = reference
    folder = result["models"]["nli"]["folders"][2]
    assert not any(k.startswith("ernie_m.") for k in torch.load(f"{folder}/pytorch_model.bin", weights_only=True))
    model = load_model(folder, device="cpu", dtype=torch.float32)
    assert isinstance(model, ErnieMModel)
    ids, mask = outputs["nli.input_ids"], outputs["nli.attention_mask"]
    with torch.no_grad():
        assert max_diff(model(ids, attention_mask=mask).last_hidden_state, outputs["nli.hidden"]) < ATOL
        assert max_diff(model(ids).last_hidden_state, outputs["nli.hidden_no_mask"]) < ATOL
        assert max_diff(model(ids).pooler_output, outputs["nli.pooled"]) < ATOL


def test_encoder_loads_from_a_task_checkpoint(reference, tmp_path):
    _, result, outputs = reference
    folder = shutil.copytree(result["models"]["nli"]["folders"][1], tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["ErnieMModel"]}))
    model = load_model(folder, device="cpu", dtype=torch.float32)
    ids, mask = outputs["nli.input_ids"], outputs["nli.attention_mask"]
    with torch.no_grad():
        assert max_diff(model(ids, attention_mask=mask).pooler_output, outputs["nli.pooled"]) < ATOL


def test_bin_is_read_weights_only_and_memory_mapped(reference, monkeypatch):
    _, result, _ = reference
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: calls.append(kwargs) or real_load(*args, **kwargs))
    load_model(result["models"]["nli"]["folders"][1], device="cpu", dtype=torch.float32)
    assert calls and all(c["weights_only"] is True and c["mmap"] is True for c in calls)


def test_bf16(reference):
    _, result, outputs = reference
    model = load_model(result["models"]["nli"]["folders"][1], device="cpu", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(outputs["nli.input_ids"], attention_mask=outputs["nli.attention_mask"])
    assert max_diff(logits, outputs["nli.logits"]) < 0.1  # bf16 rounding only


def test_bad_checkpoint_names_every_problem(reference, tmp_path):
    _, result, _ = reference
    folder = shutil.copytree(result["models"]["nli"]["folders"][1], tmp_path / "ckpt")
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    del state["ernie_m.encoder.layers.1.linear2.bias"]
    state["ernie_m.encoder.layers.0.norm1.weight"] = torch.zeros(3)
    state["ernie_m.surprise.weight"] = torch.zeros(2)
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as error:
        load_model(folder, device="cpu", dtype=torch.float32)
    message = str(error.value)
    for problem in ("1 missing: ernie_m.encoder.layers.1.linear2.bias", "1 unexpected: ernie_m.surprise.weight",
                    "ernie_m.encoder.layers.0.norm1.weight: file (3,), model (64,)"):
        assert problem in message


def test_pickles_of_other_objects_are_refused(tmp_path):
    """The weights-only unpickler refuses anything but tensors: a pickled callable never runs."""
    folder = write_ernie_m_checkpoint(tmp_path / "ckpt")
    torch.save({"x": print}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_model(folder, device="cpu", dtype=torch.float32)
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors, pytorch_model.bin"):
        load_model(folder, device="cpu", dtype=torch.float32)


def pipeline_semantics(logits: list[list[float]], entailment: int, contradiction: int, multi_label: bool) -> list[float]:
    """The pipeline's postprocess, written out from its definition on the reference logits."""
    if multi_label or len(logits) == 1:
        return [1 / (1 + math.exp(row[contradiction] - row[entailment])) for row in logits]
    exps = [math.exp(row[entailment]) for row in logits]
    return [e / sum(exps) for e in exps]


def test_zero_shot_matches_pipeline(reference):
    spec, result, _ = reference
    tokenizer = load_tokenizer(spec["zero_shot_tokenizer"])
    loaded = {name: load_model(result["models"][name]["folders"][0], device="cpu", dtype=torch.float32) for name in spec["models"]}
    assert nli_label_ids(loaded["nli"].config) == (0, 2)
    assert nli_label_ids(loaded["nli_last"].config) == (2, 0)
    assert len(result["zero_shot"]) == 8
    for case in result["zero_shot"]:
        model = loaded[case["model"]]
        template = case.get("hypothesis_template", "This example is {}.")
        ours = zero_shot_classify(model, tokenizer, case["text"], case["labels"], template, multi_label=case["multi_label"])
        assert ours.labels == case["labels_out"], case
        assert max(abs(a - b) for a, b in zip(ours.scores, case["scores"])) < ATOL
        expected = dict(zip(case["labels"], pipeline_semantics(case["logits"], *nli_label_ids(model.config), case["multi_label"])))
        assert max(abs(expected[label] - score) for label, score in zip(ours.labels, ours.scores)) < ATOL
        assert ours.scores == sorted(ours.scores, reverse=True) and not ours.truncated


def test_zero_shot_truncates_long_texts(reference):
    spec, result, _ = reference
    tokenizer = load_tokenizer(spec["zero_shot_tokenizer"])
    model = load_model(result["models"]["nli"]["folders"][0], device="cpu", dtype=torch.float32)
    assert tokenizer.model_max_length == 512 > model.config.max_position_embeddings  # the model's limit applies
    ours = zero_shot_classify(model, tokenizer, "football " * 200, ["sports", "politics"])
    assert ours.truncated and len(ours.labels) == 2 and abs(sum(ours.scores) - 1) < 1e-6


def test_factory_checkpoint_is_what_the_reference_expects(reference):
    spec, result, _ = reference
    factory = result["factory"]
    assert factory["info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    folder = spec["factory_checkpoint"]
    tokenizer = load_tokenizer(folder)
    assert tokenizer.encode("Hello 你好", "This example is 2024.") == factory["input_ids"]
    model = load_model(folder, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([factory["input_ids"]]), attention_mask=torch.ones(1, len(factory["input_ids"])))
    assert max_diff(logits[0], torch.tensor(factory["logits"])) < ATOL
    assert zero_shot_classify(model, tokenizer, "我喜欢足球", ["体育", "政治"]).labels


def test_hub_fetches_the_family_files(tmp_path, monkeypatch):
    """An ErnieM repo id fetches its tokenizer files, and pytorch_model.bin only when the repo
    has no safetensors; a text repo fetches what it did before."""
    import huggingface_hub

    configs = {"ernie-m": {"architectures": ["ErnieMForSequenceClassification"]}, "text": {"architectures": ["Ernie4_5ForCausalLM"]},
               "vl": {"architectures": ["Ernie4_5_VLMoeForConditionalGeneration"]}}
    fetched = []

    def hf_hub_download(repo_id, filename, revision=None):
        (tmp_path / repo_id).mkdir(exist_ok=True)
        (tmp_path / repo_id / filename).write_text(json.dumps(configs[repo_id]))
        return str(tmp_path / repo_id / filename)

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        fetched.append((repo_id, allow_patterns))
        return str(tmp_path / repo_id)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    models.hub.resolve_checkpoint("ernie-m")
    models.hub.resolve_checkpoint("text")
    models.hub.resolve_checkpoint("vl")
    assert fetched == [("ernie-m", models.hub.ERNIE_M_FILES), ("ernie-m", models.hub.PICKLED_WEIGHTS),
                       ("text", models.hub.CHECKPOINT_FILES), ("vl", models.hub.VL_FILES)]
    for name in ("preprocessor_config.json", "video_preprocessor_config.json", "*.ttf", "*.safetensors"):
        assert name in models.hub.VL_FILES
    for name in ("vocab.txt", "sentencepiece.bpe.model", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
        assert name in models.hub.ERNIE_M_FILES
    (tmp_path / "ernie-m" / "model.safetensors").write_bytes(b"")
    fetched.clear()
    models.hub.resolve_checkpoint("ernie-m")
    assert fetched == [("ernie-m", models.hub.ERNIE_M_FILES)]
