"""int8 weight-only mode: each quantised matmul equals its own dequantised reference, the
quantised model equals a model holding the dequantised weights, and it serves generation
(alone and batched)."""
from __future__ import annotations

import pytest
import torch

from models import BatchGenerator, generate, load_model
from models.factory import tiny_config, write_checkpoint, write_ernie_m_checkpoint
from models.quantize import INT8_KERNEL_MAX_ROWS, Int8Embedding, Int8Linear, int8_matmul, quantize_rows


def dequantised(weight, scales):
    return weight.float() * scales.float()[:, None]


def test_rows_round_to_the_nearest_step():
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different ranges
    q, scales = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert ((dequantised(q, scales) - w).abs() <= scales[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("rows", [1, INT8_KERNEL_MAX_ROWS, INT8_KERNEL_MAX_ROWS + 1, 100])  # both kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_matmul_equals_its_dequantised_reference(rows, dtype):
    q, scales = quantize_rows(torch.randn(48, 64))
    x = torch.randn(rows, 64)
    expected = x @ dequantised(q, scales).T
    out = int8_matmul(x.to(dtype), q, scales.to(dtype)).float()
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out, expected, atol=tolerance * expected.abs().max().item(), rtol=0)


@pytest.fixture(scope="module", params=["dense", "moe"])
def folder(request, tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp(request.param), tiny_config(request.param), tokenizer=False)


def test_quantised_model_equals_the_model_with_dequantised_weights(folder):
    quantised = load_model(folder, device="cpu", dtype=torch.float32, quantize="int8")
    reference = load_model(folder, device="cpu", dtype=torch.float32)
    modules = dict(quantised.named_modules())
    linears = {name for name, m in modules.items() if isinstance(m, Int8Linear)}
    assert {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.shared_experts.down_proj", "lm_head"} & linears
    assert isinstance(quantised.model.embed_tokens, Int8Embedding)
    with torch.no_grad():
        for name, module in reference.named_modules():
            if name in linears:
                module.weight.copy_(dequantised(modules[name].weight, modules[name].scales))
        tied = quantised.model.embed_tokens
        reference.model.embed_tokens.weight.copy_(dequantised(tied.weight, tied.scales))
    ids = torch.randint(3, reference.config.vocab_size, (1, 30))
    for n in (1, 30):  # a decode-sized and a prefill-sized matmul
        torch.testing.assert_close(quantised(ids[:, :n]), reference(ids[:, :n]), atol=1e-4, rtol=1e-4)
    prompt = ids[0, :12]
    tokens = list(generate(quantised, prompt, 10, eos_token_ids=[]))
    assert tokens == list(generate(reference, prompt, 10, eos_token_ids=[]))
    assert list(BatchGenerator(quantised).generate(prompt, 10, eos_token_ids=[])) == tokens


def test_dense_weights_take_half_the_bytes(tmp_path):
    def nbytes(model):
        return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])

    folder = write_checkpoint(tmp_path, tiny_config("dense"), tokenizer=False)
    full, quantised = (load_model(folder, device="cpu", dtype=torch.bfloat16, quantize=q) for q in (None, "int8"))
    assert nbytes(quantised) < 0.55 * nbytes(full)  # scales and norms stay bf16


def test_bad_quantize_requests_are_refused(folder, tmp_path):
    with pytest.raises(ValueError, match="quantize must be one of"):
        load_model(folder, device="cpu", quantize="int4")
    with pytest.raises(ValueError, match="ERNIE 4.5"):
        load_model(write_ernie_m_checkpoint(tmp_path / "m"), device="cpu", quantize="int8")
