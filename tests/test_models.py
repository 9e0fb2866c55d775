"""Parity of our ERNIE 4.5 dense and MoE models with transformers on the same checkpoints.

The reference checkpoints are written by transformers' own `save_pretrained`, so the on-disk layout
under test is the reference's, not ours."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    Ernie4_5Config,
    Ernie4_5ForCausalLM,
    Ernie4_5_MoeConfig,
    Ernie4_5_MoeForCausalLM,
)

from models import CheckpointError, generate, load_model
from models.factory import tiny_config, write_checkpoint

VOCAB = 320


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights with spread (so greedy argmax has no near-ties), norms and biases away from 1/0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1 + 0.2 * noise)
            elif "e_score_correction_bias" in name:
                p.copy_(0.05 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise * p.shape[-1] ** -0.5)
    return model


def dense_config(**overrides) -> Ernie4_5Config:
    base = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    )
    return Ernie4_5Config(**{**base, **overrides})


def moe_config(**overrides) -> Ernie4_5_MoeConfig:
    base = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, moe_intermediate_size=24, moe_k=2,
        moe_num_experts=8, moe_num_shared_experts=2, moe_layer_start_index=1, moe_layer_interval=1,
    )
    return Ernie4_5_MoeConfig(**{**base, **overrides})


def save_reference(tmp_path, config, seed=0, dtype=torch.float32, **save_kwargs):
    cls = Ernie4_5_MoeForCausalLM if isinstance(config, Ernie4_5_MoeConfig) else Ernie4_5ForCausalLM
    reference = randomize(cls(config).eval(), seed)
    folder = tmp_path / "ckpt"
    reference.to(dtype).save_pretrained(folder, **save_kwargs)
    return reference, folder


def compare_logits(reference, ours, shapes=((1, 1), (2, 17), (3, 6)), atol=1e-4):
    g = torch.Generator().manual_seed(1)
    for batch, length in shapes:
        ids = torch.randint(0, VOCAB, (batch, length), generator=g)
        with torch.no_grad():
            expected = reference(ids).logits.float()
            got = ours(ids).float()
        assert got.shape == (batch, length, VOCAB)
        assert (got - expected).abs().max().item() < atol, (batch, length)


DENSE_CASES = {
    "gqa": {},
    "mha": dict(num_key_value_heads=4),
    "head_dim_is_width_over_heads": dict(head_dim=16),
    "untied": dict(tie_word_embeddings=False),
    "bias": dict(use_bias=True),
}


@pytest.mark.parametrize("case", DENSE_CASES)
def test_dense_logits_match_reference(tmp_path, case):
    reference, folder = save_reference(tmp_path, dense_config(**DENSE_CASES[case]))
    compare_logits(reference, load_model(folder, device="cpu", dtype=torch.float32))


MOE_CASES = {
    "k2_shared2": {},
    "k3_shared1": dict(moe_k=3, moe_num_shared_experts=1),
    "no_shared_start0": dict(moe_num_shared_experts=0, moe_layer_start_index=0),
    "interval2": dict(moe_layer_interval=2, moe_k=3),
    "end_index": dict(moe_layer_start_index=0, moe_layer_end_index=2, num_key_value_heads=4),
}


@pytest.mark.parametrize("case", MOE_CASES)
def test_moe_logits_match_reference(tmp_path, case):
    reference, folder = save_reference(tmp_path, moe_config(**MOE_CASES[case]))
    assert reference.model.layers[1].mlp.gate.moe_statics.e_score_correction_bias.abs().sum() > 0
    compare_logits(reference, load_model(folder, device="cpu", dtype=torch.float32))


def test_moe_per_expert_loop_matches_grouped_gemm(tmp_path, monkeypatch):
    """The fallback for devices without grouped GEMM (pre-sm80 GPUs, fp16) computes the same."""
    reference, folder = save_reference(tmp_path, moe_config(moe_k=3))
    monkeypatch.setattr("models.ernie4_5.grouped_mm_supported", lambda x: False)
    compare_logits(reference, load_model(folder, device="cpu", dtype=torch.float32))


def test_moe_layer_rule(tmp_path):
    _, folder = save_reference(tmp_path, moe_config(moe_layer_interval=2, num_hidden_layers=6, moe_layer_start_index=2))
    model = load_model(folder, device="cpu", dtype=torch.float32)
    sparse = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    assert sparse == [3, 5]


@pytest.mark.parametrize("config", [dense_config(), moe_config(moe_k=3)], ids=["dense", "moe"])
def test_greedy_generation_matches_reference(tmp_path, config):
    reference, folder = save_reference(tmp_path, config)
    ours = load_model(folder, device="cpu", dtype=torch.float32)
    prompt = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(2))
    expected = reference.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert list(generate(ours, prompt[0].tolist(), 32, eos_token_ids=[])) == expected[0, 7:].tolist()


def test_bf16_checkpoint_loads_in_any_dtype(tmp_path):
    _, folder = save_reference(tmp_path, moe_config(), dtype=torch.bfloat16)
    header = json.loads((folder / "config.json").read_text())
    assert header.get("dtype", header.get("torch_dtype")) == "bfloat16"
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    compare_logits(reference, load_model(folder, device="cpu", dtype=torch.float32))
    ours = load_model(folder, device="cpu", dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    router = ours.model.layers[1].mlp
    assert router.gate.weight.dtype == router.moe_statics.e_score_correction_bias.dtype == torch.float32
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    compare_logits(reference, ours, atol=0.25)  # bf16 rounding only


def test_sharded_checkpoint(tmp_path):
    reference, folder = save_reference(tmp_path, moe_config(), max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    compare_logits(reference, load_model(folder, device="cpu", dtype=torch.float32))


def test_kv_cache_steps_equal_full_forward(tmp_path):
    _, folder = save_reference(tmp_path, moe_config())
    model = load_model(folder, device="cpu", dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 16)
        pieces = [model(ids[:, :5], cache, 0), model(ids[:, 5:9], cache, 5)]
        pieces += [model(ids[:, i : i + 1], cache, i) for i in range(9, 12)]
    assert (torch.cat(pieces, dim=1) - full).abs().max() < 1e-4


def edit_checkpoint(folder, change):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_original_hub_config_and_extra_tensors(tmp_path):
    """The first hub upload: old architecture name, top-level rope_theta, a stored tied lm_head and
    MTP tensors; all must load and give the same function."""
    reference, folder = save_reference(tmp_path, dense_config())
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["Ernie4_5_ForCausalLM"]
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    (folder / "config.json").write_text(json.dumps(config))

    def add_extras(tensors):
        tensors["lm_head.weight"] = torch.zeros(VOCAB, 64)
        tensors["model.mtp_linear_proj.0.weight"] = torch.zeros(64, 128)

    edit_checkpoint(folder, add_extras)
    compare_logits(reference, load_model(folder, device="cpu", dtype=torch.float32))


def test_mismatched_checkpoint_names_every_problem(tmp_path):
    _, folder = save_reference(tmp_path, dense_config())

    def corrupt(tensors):
        del tensors["model.layers.1.mlp.up_proj.weight"]
        tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)
        tensors["model.surprise.weight"] = torch.zeros(2)

    edit_checkpoint(folder, corrupt)
    with pytest.raises(CheckpointError) as error:
        load_model(folder, device="cpu", dtype=torch.float32)
    message = str(error.value)
    for name in ("model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.k_proj.weight", "model.surprise.weight"):
        assert name in message


def test_unsupported_checkpoints_give_clear_errors(tmp_path):
    _, folder = save_reference(tmp_path, dense_config())
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_model(folder, device="cpu", dtype=torch.float32)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="LlamaForCausalLM"):
        load_model(folder, device="cpu", dtype=torch.float32)


def test_model_placed_by_device_map(tmp_path):
    """The device-map path used to split a model across GPUs by layers (all on CPU here)."""
    reference, folder = save_reference(tmp_path, moe_config())
    names = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2", "model.layers.3", "model.norm"]
    ours = load_model(folder, device={name: "cpu" for name in names}, dtype=torch.float32)
    compare_logits(reference, ours)
    with pytest.raises(ValueError, match="unplaced"):
        load_model(folder, device={"model.layers": "cpu"})


@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a GPU")
def test_model_split_between_cpu_and_gpu(tmp_path):
    reference, folder = save_reference(tmp_path, moe_config())
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cuda:0",
                  "model.layers.2": "cuda:0", "model.layers.3": "cpu", "model.norm": "cuda:0"}
    ours = load_model(folder, device=device_map, dtype=torch.float32)
    compare_logits(reference, ours, atol=1e-3)
    single = load_model(folder, device="cpu", dtype=torch.float32)
    prompt = [5, 6, 7]
    assert list(generate(ours, prompt, 8, eos_token_ids=[])) == list(generate(single, prompt, 8, eos_token_ids=[]))


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_factory_checkpoints_are_what_transformers_expects(tmp_path, kind):
    """Our generated checkpoints (used by the demo and other tests) load in the reference with
    no missing or unexpected tensors (MTP aside, which it ignores too) and give the same logits."""
    folder = write_checkpoint(tmp_path, tiny_config(kind), max_shard_bytes=2**17)
    assert (folder / "model.safetensors.index.json").is_file()
    reference, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert all("mtp" in key for key in info["unexpected_keys"])
    ours = load_model(folder, device="cpu", dtype=torch.float32)
    ids = torch.randint(0, ours.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert (reference.eval()(ids).logits - ours(ids)).abs().max() < 1e-4


@pytest.mark.parametrize(("heads", "kv_heads", "dtype", "tolerance"), [(16, 2, torch.float32, 1e-6), (8, 8, torch.float32, 1e-6),
                                                                       (16, 2, torch.bfloat16, 1e-2)])
def test_decode_attention_folds_query_groups_exactly(heads, kv_heads, dtype, tolerance):
    from models.layers import sdpa

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 300, heads, 64, generator=generator).to(dtype)[:, -1:].transpose(1, 2)  # as Attention lays it out
    k, v = (torch.randn(2, kv_heads, 300, 64, generator=generator).to(dtype) for _ in range(2))
    expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
    assert (sdpa(q, k, v, start=299).float() - expected).abs().max() < tolerance
