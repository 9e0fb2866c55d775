"""Parity of our ERNIE 4.5 VL model with transformers' Ernie4_5_VLMoeForConditionalGeneration.

Reference checkpoints are tiny random models written by transformers' own `save_pretrained`; the
inputs are built here as the reference processor lays them out (placeholder runs between start/end
tokens, pixel rows of 3x14x14 = 588 values, a (t, h, w) grid per image/video in patches)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_models import randomize
from transformers import Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeForConditionalGeneration

from models import CheckpointError, KVCache, generate, load_model, load_tokenizer
from models.factory import tiny_config, write_checkpoint

VOCAB = 320
IMAGE, IMAGE_START, IMAGE_END, VIDEO, VIDEO_START, VIDEO_END = 300, 301, 302, 303, 304, 305
TOKENS = dict(image_token_id=IMAGE, image_start_token_id=IMAGE_START, image_end_token_id=IMAGE_END,
              video_token_id=VIDEO, video_start_token_id=VIDEO_START, video_end_token_id=VIDEO_END)


def vl_config(vocab_size=VOCAB, tokens=TOKENS, **text) -> Ernie4_5_VLMoeConfig:
    base = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, moe_intermediate_size=[32, 16], moe_k=2,
        moe_num_experts=4, moe_num_shared_experts=1,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[3, 3, 2]),
    )
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2)
    return Ernie4_5_VLMoeConfig(text_config={**base, **text}, vision_config=vision, **tokens)


def save_reference(tmp_path, config, seed=0):
    reference = randomize(Ernie4_5_VLMoeForConditionalGeneration(config).eval(), seed)
    folder = tmp_path / "ckpt"
    reference.save_pretrained(folder)
    return reference, folder


def build_inputs(parts, seed=0, ids=TOKENS, vocab=VOCAB) -> dict[str, torch.Tensor]:
    """Prompt inputs from parts: an int n (n text tokens), ("image", h, w) or ("video", t, h, w)
    with sizes in 14-px patches."""
    g = torch.Generator().manual_seed(seed)
    tokens, pixels = [], {"image": [], "video": []}
    grids = {"image": [], "video": []}
    for part in parts:
        if isinstance(part, int):
            tokens += torch.randint(3, min(vocab, 290), (part,), generator=g).tolist()
            continue
        kind, *grid = part
        t, h, w = grid if kind == "video" else [1, *grid]
        merged = t * h * w // 4 // (2 if kind == "video" else 1)  # 2x2 patches, 2 frames per token
        tokens += [ids[f"{kind}_start_token_id"], *[ids[f"{kind}_token_id"]] * merged, ids[f"{kind}_end_token_id"]]
        pixels[kind].append(torch.randn(t * h * w, 588, generator=g))
        grids[kind].append([t, h, w])
    inputs = {"input_ids": torch.tensor([tokens])}
    for kind, pixel_key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        if grids[kind]:
            inputs[pixel_key] = torch.cat(pixels[kind])
            inputs[f"{kind}_grid_thw"] = torch.tensor(grids[kind])
    return inputs


def reference_inputs(inputs, ids=TOKENS) -> dict[str, torch.Tensor]:
    """Add the two type-id tensors the reference processor returns: placeholders only (positions),
    and placeholders plus start/end tokens (expert routing)."""
    x = inputs["input_ids"]
    mm = (x == ids["image_token_id"]).long() + 2 * (x == ids["video_token_id"]).long()
    moe = mm.clone()
    moe[(x == ids["image_start_token_id"]) | (x == ids["image_end_token_id"])] = 1
    moe[(x == ids["video_start_token_id"]) | (x == ids["video_end_token_id"])] = 2
    return {**inputs, "mm_token_type_ids": mm, "moe_mm_token_type_ids": moe}


def relative_error(got, expected) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


def compare(reference, ours, inputs, ids=TOKENS) -> None:
    with torch.no_grad():
        expected = reference(**reference_inputs(inputs, ids)).logits
        got = ours(**inputs)
    assert got.shape == expected.shape == (1, inputs["input_ids"].shape[1], reference.config.text_config.vocab_size)
    assert relative_error(got, expected) < 1e-4


IMAGE_AND_VIDEO = [3, ("image", 4, 6), 2, ("video", 4, 4, 4), 3]
CASES = {  # (text config overrides, prompt parts)
    "image_4x6": ({}, [3, ("image", 4, 6), 4]),
    "image_2x2": ({}, [2, ("image", 2, 2), 3]),
    "image_tall_6x2": ({}, [4, ("image", 6, 2), 1]),
    "image_wide_2x10": ({}, [1, ("image", 2, 10), 5]),
    "two_images": ({}, [2, ("image", 4, 6), 3, ("image", 2, 4), 2]),
    "video": ({}, [3, ("video", 4, 4, 4), 3]),
    "long_video_6_frames": ({}, [2, ("video", 6, 2, 4), 2]),  # more frame pairs than rows/cols
    "image_and_video": ({}, IMAGE_AND_VIDEO),
    "text_only": ({}, [11]),
    "all_layers_sparse": (dict(mlp_layer_types=["sparse"] * 3), IMAGE_AND_VIDEO),
    "dense_layers_0_and_2": (dict(mlp_layer_types=["dense", "sparse", "dense"]), IMAGE_AND_VIDEO),
    "k3_shared2": (dict(moe_k=3, moe_num_shared_experts=2), IMAGE_AND_VIDEO),
    "k1_no_shared": (dict(moe_k=1, moe_num_shared_experts=0), IMAGE_AND_VIDEO),
    "head_dim_32_mha": (
        dict(num_attention_heads=2, num_key_value_heads=2,
             rope_parameters=dict(rope_type="default", rope_theta=500000.0, mrope_section=[6, 6, 4])),
        IMAGE_AND_VIDEO,
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_reference(tmp_path, case):
    overrides, parts = CASES[case]
    reference, folder = save_reference(tmp_path, vl_config(**overrides))
    assert reference.model.language_model.layers[1].mlp.vision_moe.gate.moe_statics.e_score_correction_bias.abs().sum() > 0
    compare(reference, load_model(folder, device="cpu", dtype=torch.float32), build_inputs(parts))


@pytest.mark.parametrize("case", ["image_4x6", "two_images", "long_video_6_frames", "image_and_video", "text_only"])
def test_greedy_generation_matches_reference(tmp_path, case):
    """Prefill with the media, then decode with positions continuing from the prompt's largest + 1."""
    overrides, parts = CASES[case]
    reference, folder = save_reference(tmp_path, vl_config(**overrides))
    ours = load_model(folder, device="cpu", dtype=torch.float32)
    inputs = build_inputs(parts)
    prompt = inputs.pop("input_ids")
    expected = reference.generate(
        **reference_inputs({"input_ids": prompt, **inputs}), max_new_tokens=8, min_new_tokens=8, do_sample=False
    )[0, prompt.shape[1]:].tolist()
    assert list(generate(ours, prompt[0].tolist(), 8, eos_token_ids=[], **inputs)) == expected


def test_decode_positions_continue_after_media(tmp_path):
    """Cached decode steps equal one full forward of prompt + continuation (whose extra tokens sit
    at positions max + 1, ...), and the offset is the reference's rope delta."""
    _, folder = save_reference(tmp_path, vl_config())
    model = load_model(folder, device="cpu", dtype=torch.float32)
    inputs = build_inputs(IMAGE_AND_VIDEO)
    prompt = inputs.pop("input_ids")
    extra = torch.tensor([[7, 8, 9]])
    with torch.no_grad():
        cache = model.new_cache(1, 40)
        pieces = [model(prompt, **inputs, cache=cache)]
        # 26 tokens span 17 positions: 3 text, start, image (2x3 merged: 3), end, 2 text, start,
        # video (2 pairs of 2x2: 2), end, 3 text.
        assert prompt.shape[1] == 26 and cache.position_offset.tolist() == [17 - 26]
        pieces += [model(extra[:, i : i + 1], cache=cache, start=prompt.shape[1] + i) for i in range(3)]
        stepped = torch.cat(pieces, dim=1)
        # The same positions in one pass: the continuation as text at max + 1 (a text run after
        # the last end token), routed to text experts, equals the stepped decode.
        unstepped = model(torch.cat([prompt, extra], dim=1), **inputs)
    assert (stepped - unstepped).abs().max() < 1e-4


def to_original_layout(folder, config) -> None:
    """Rewrite a save_pretrained folder as the hub's original upload (checkpoints.md §4.1, §4.2):
    flat config with list-valued MoE keys, the vision tower at the top level, a stored lm_head."""
    tensors = load_file(folder / "model.safetensors")
    renamed = {k.removeprefix("model.") if k.startswith("model.vision_model.") else k: v for k, v in tensors.items()}
    renamed["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})
    text, vision = config.text_config, config.vision_config
    sparse = [i for i, kind in enumerate(text.mlp_layer_types) if kind == "sparse"]
    original = {
        "architectures": ["Ernie4_5_VLMoeForConditionalGeneration"], "model_type": "ernie4_5_moe_vl",
        "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers, "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads, "vocab_size": text.vocab_size,
        "max_position_embeddings": 4096, "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": text.rope_parameters["rope_theta"], "use_bias": False, "tie_word_embeddings": True,
        "moe_num_experts": [text.moe_num_experts] * 2, "moe_intermediate_size": text.moe_intermediate_size,
        "moe_k": text.moe_k, "moe_num_shared_experts": text.moe_num_shared_experts,
        "moe_layer_start_index": [sparse[0], sparse[0]], "moe_layer_end_index": [29, 28],
        "moe_layer_interval": 1, "moe_use_aux_free": True, "im_patch_id": config.image_token_id,
        "pixel_hidden_size": vision.hidden_size, "spatial_conv_size": 2, "temporal_conv_size": 2,
        "use_temporal_conv": True, "rope_3d": True, "freq_allocation": text.rope_parameters["mrope_section"][2],
        "vision_config": {
            "depth": vision.depth, "embed_dim": vision.hidden_size, "hidden_size": vision.hidden_size,
            "num_heads": vision.num_heads, "mlp_ratio": vision.intermediate_size // vision.hidden_size,
            "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "hidden_act": "quick_gelu",
        },
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(original))


def test_original_hub_layout_gives_the_same_logits(tmp_path):
    """The original upload's names and config (its special token ids are the fixed ones of the VL
    tokenizer, so this model has the real vocabulary size)."""
    config = vl_config(vocab_size=103424, tokens={})
    reference, folder = save_reference(tmp_path, config)
    to_original_layout(folder, config)
    ours = load_model(folder, device="cpu", dtype=torch.float32)
    ids = {k: getattr(config, k) for k in TOKENS}
    assert ids["image_token_id"] == 100295 and ids["video_token_id"] == 103367
    inputs = build_inputs(IMAGE_AND_VIDEO, ids=ids)
    compare(reference, ours, inputs, ids)
    # Baidu's processor marks video patches with the image placeholder too: same function.
    original_ids = inputs["input_ids"].masked_fill(inputs["input_ids"] == ids["video_token_id"], ids["image_token_id"])
    with torch.no_grad():
        assert (ours(**{**inputs, "input_ids": original_ids}) - ours(**inputs)).abs().max() == 0


def test_transformers_module_names_give_the_same_logits(tmp_path):
    """Weights stored under transformers' module names (checkpoints.md §4.6: language_model,
    vision_tower, text_moe/vision_moe with stacked experts), as some converted uploads have them."""
    reference, folder = save_reference(tmp_path, vl_config())
    state = {k: v.contiguous() for k, v in reference.state_dict().items() if k != "lm_head.weight"}
    assert "model.language_model.layers.1.mlp.vision_moe.experts.gate_up_proj" in state
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    compare(reference, load_model(folder, device="cpu", dtype=torch.float32), build_inputs(IMAGE_AND_VIDEO))


def test_mismatched_checkpoint_names_every_problem(tmp_path):
    _, folder = save_reference(tmp_path, vl_config())
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.vision_model.blocks.1.attn.qkv.bias"], tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    tensors["model.layers.1.mlp.gate.weight_1"] = torch.zeros(4, 64)  # not transposed
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as error:
        load_model(folder, device="cpu", dtype=torch.float32)
    for name in ("model.vision_model.blocks.1.attn.qkv.bias", "model.layers.1.mlp.experts.5.up_proj.weight",
                 "model.layers.1.mlp.gate.weight_1"):
        assert name in str(error.value)


def test_placeholders_must_match_the_media(tmp_path):
    _, folder = save_reference(tmp_path, vl_config())
    model = load_model(folder, device="cpu", dtype=torch.float32)
    inputs = build_inputs([2, ("image", 4, 6), 2])
    ids = inputs.pop("input_ids")
    with pytest.raises(ValueError, match="more image placeholders than grids"):
        model(ids)
    with pytest.raises(ValueError, match="no image pixels"):
        model(ids, image_grid_thw=inputs["image_grid_thw"])
    with pytest.raises(ValueError, match="does not match its grids"):
        model(torch.cat([ids[:, :3], ids[:, 4:]], dim=1), **inputs)  # one placeholder short


def test_factory_vl_checkpoint_loads_and_runs(tmp_path):
    """The demo's tiny VL checkpoint: official original layout and dtypes, VL special tokens in
    the tokenizer at the ids config.json names; it loads and generates from an image prompt."""
    config = tiny_config("vl")
    folder = write_checkpoint(tmp_path, config)
    header = json.loads((folder / "config.json").read_text())
    assert header["architectures"] == ["Ernie4_5_VLMoeForConditionalGeneration"] and "text_config" not in header
    tensors = load_file(folder / "model.safetensors")
    assert tensors["vision_model.patch_embed.proj.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.1.mlp.gate.weight"].shape == (config["hidden_size"], config["moe_num_experts"][0])
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    assert tensors["model.layers.1.mlp.moe_statics.e_score_correction_bias"].shape == (2, config["moe_num_experts"][0])
    tokenizer = load_tokenizer(folder)
    model = load_model(folder, device="cpu")
    c = model.config
    for token, expected in (("<|IMAGE_PLACEHOLDER|>", c.image_token_id), ("<|IMAGE_START|>", c.image_start_token_id),
                            ("<|IMAGE_END|>", c.image_end_token_id), ("<|VIDEO_PLACEHOLDER|>", c.video_token_id),
                            ("<|VIDEO_START|>", c.video_start_token_id), ("<|VIDEO_END|>", c.video_end_token_id)):
        assert tokenizer.encode(f"a{token}b")[1:-1] == [expected], token
        assert expected in tokenizer.all_special_ids
    ids = {k: getattr(c, k) for k in TOKENS}
    inputs = build_inputs([3, ("image", 4, 4), 2, ("video", 2, 2, 4), 2], ids=ids, vocab=c.vocab_size)
    with torch.no_grad():
        logits = model(**inputs)
    assert logits.shape == (1, inputs["input_ids"].shape[1], c.vocab_size) and logits.isfinite().all()
    prompt = inputs.pop("input_ids")[0].tolist()
    assert len(list(generate(model, prompt, 4, eos_token_ids=[], **inputs))) == 4
    assert isinstance(model.new_cache(1, 4), KVCache)
