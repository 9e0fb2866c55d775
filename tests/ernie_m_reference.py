"""transformers 4.56.2, the last release with ErnieM, as a reference in a virtual environment of its own.

It cannot share the test environment (transformers 5.x there), so `reference_python()` makes a
venv once, with the system site-packages (torch, sentencepiece, numpy come from there) and the
three packages 4.56.2 needs at other versions installed over them, cached under
$ERNIE_REFERENCE_CACHE (default ~/.cache/ernie-studio/reference) and keyed by the Python version
and the requirements. Run as a script inside that venv, this file writes the reference's
checkpoints and outputs for the tests to compare against (see `main`).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REQUIREMENTS = ["transformers==4.56.2", "huggingface_hub>=0.34,<1.0", "tokenizers>=0.22,<=0.23.0"]
PAD = 1


def reference_python() -> Path:
    """The interpreter of the reference venv, created on first use (~25 s, ~160 MB)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ernie-studio" / "reference"
    root = Path(os.environ.get("ERNIE_REFERENCE_CACHE") or default)
    key = hashlib.sha256(json.dumps([sys.version, REQUIREMENTS]).encode()).hexdigest()[:12]
    venv = root / f"transformers-4.56.2-py{sys.version_info.major}{sys.version_info.minor}-{key}"
    python, complete = venv / "bin" / "python", venv / ".complete"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent test sessions build it once
        if not complete.is_file():
            shutil.rmtree(venv, ignore_errors=True)
            for command in (
                [sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *REQUIREMENTS],
            ):
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode:
                    raise RuntimeError(f"building the reference venv failed: {' '.join(command)}\n{result.stderr[-3000:]}")
            complete.write_text("\n".join(REQUIREMENTS))
    return python


# ---- what the tests give the reference -------------------------------------------------------------

TRAINING_TEXT = [
    "Hello world, this is a test of the tokenizer. The weather is nice today, isn't it?",
    "Bonjour le monde, ça va très bien. Größe, Straße und Äpfel sind schön.",
    "你好，世界！今天天气很好。我们正在测试分词器，请多多指教。中国的首都是北京。",
    "こんにちは世界、これはテストです。東京は日本の首都です。カタカナとひらがな。",
    "안녕하세요 세계, 이것은 시험입니다.",
    "Привет, мир! Как дела? Москва — столица России.",
    "مرحبا بالعالم، هذا اختبار للمحلل اللغوي",
    "Γειά σου κόσμε, αυτό είναι ένα τεστ. ΟΔΟΣ οδός.",
    "שלום עולם, זה מבחן",
    "नमस्ते दुनिया, यह एक परीक्षण है।",
    "สวัสดีชาวโลก นี่คือการทดสอบ",
    "Numbers 12345 and dates 2024-11-23, prices $3.50 and 100%; emoji 😀 🎉 in text!",
] * 20

SAMPLES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "你好，世界！今天天气很好。《红楼梦》【注】",
    "日本語のテキストとカタカナ、東京2024年",
    "한국어 텍스트입니다",
    "Привет, мир! Ёлка",
    "مرحبا بالعالم ١٢٣",
    "Γειά σου ΟΔΟΣ",
    "שלום עולם",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "ქართული და Հայերեն",  # scripts the model has never seen: unknown runs
    "digits 0123456789, 3.14159 and 92000abc12",
    "ＡＢＣ１２３！ full-width ｶﾀｶﾅ and ① ²",
    "emoji 😀🎉👍🏽 and a family 👨‍👩‍👧",
    "punctuation: a,b;c:d.e?f!g~h，；：。？！",
    "  leading spaces,   runs   of spaces,\ttabs\t\tand trailing  ",
    "line one\nline two\r\n",
    "special [SEP] tokens [CLS]in[MASK] text [UNK]",
    "<s> and </s> and <unk> are plain text here",
    "a 1 b 2 ▁ c",
    "",
    "   ",
]
PAIRS = [
    ("I love football.", "This example is sports."),
    ("今天天气很好。", "This example is 天气."),
    ("", "empty premise"),
    ("Привет, мир!", ""),
    ("12 apples", "ＡＢＣ 2024"),
]


def train_tokenizer(folder: Path, **config) -> Path:
    """A unigram sentencepiece.bpe.model trained here (NFKC, like XLM-R's), vocab.txt in ErnieM's
    layout ([CLS] [PAD] [SEP] [UNK], then the pieces after <unk> <s> </s>, then [MASK]) and a
    tokenizer_config.json with `config`."""
    import io

    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT), model_writer=buffer, vocab_size=700, model_type="unigram",
        character_coverage=0.9995, hard_vocab_limit=False, minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_proto=buffer.getvalue())
    assert [processor.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    pieces = [processor.id_to_piece(i) for i in range(3, processor.get_piece_size())]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sentencepiece.bpe.model").write_bytes(buffer.getvalue())
    (folder / "vocab.txt").write_text("".join(f"{t}\n" for t in ["[CLS]", "[PAD]", "[SEP]", "[UNK]", *pieces, "[MASK]"]))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ErnieMTokenizer", **config}))
    return folder


def reference_spec(work: Path) -> dict:
    """Tokenizers and a factory checkpoint written here, and what the reference is to compute."""
    from models.factory import write_ernie_m_checkpoint

    tokenizers = {
        "trained": str(train_tokenizer(work / "tokenizer")),
        "lower": str(train_tokenizer(work / "tokenizer_lower", do_lower_case=True)),
        "factory": str(write_ernie_m_checkpoint(work / "factory")),
    }
    vocab_size = len((work / "tokenizer" / "vocab.txt").read_text().splitlines())
    dims = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                max_position_embeddings=96)
    return {
        "tokenizers": tokenizers,
        "texts": [(text, None) for text in SAMPLES] + PAIRS,
        "models": {
            "nli": {**dims, "id2label": {0: "entailment", 1: "neutral", 2: "contradiction"}},
            "nli_last": {**dims, "num_hidden_layers": 3, "id2label": {0: "contradiction", 1: "neutral", 2: "Entailment"}},
        },
        "zero_shot_tokenizer": tokenizers["trained"],
        "zero_shot": [
            {"text": "I love playing football on Sundays.", "labels": ["sports", "politics", "cooking", "天气"], "multi_label": False},
            {"text": "今天天气很好。", "labels": ["weather", "sports", "finance"], "multi_label": True},
            {"text": "Привет, мир!", "labels": ["greeting"], "multi_label": False},
            {"text": "Numbers 12345", "labels": ["math", "art"], "multi_label": False, "hypothesis_template": "Das Thema ist {}."},
        ],
        "factory_checkpoint": tokenizers["factory"],
    }


def run_reference(spec: dict, out: Path) -> dict:
    """Run `main` in the reference venv on `spec`; returns what it wrote to out/result.json."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec, ensure_ascii=False))
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [str(reference_python()), __file__, str(out)], capture_output=True, text=True, env=env, cwd=out, timeout=600
    )
    if result.returncode:
        raise RuntimeError(f"the reference script failed:\n{result.stderr[-5000:]}")
    return json.loads((out / "result.json").read_text())


# ---- inside the reference venv --------------------------------------------------------------------

def randomize(model, seed: int):
    """Weights with spread, norms and biases away from 1/0, so a wrong op shows in the outputs."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise * p.shape[-1] ** -0.5)
    return model.eval()


def main(out: Path) -> None:
    """Writes, for the spec's tokenizer folders, the reference's ids of every text and pair; for
    each model config, checkpoints saved by `save_pretrained` (safetensors and .bin; the encoder
    alone too) with the outputs on a padded batch; the zero-shot pipeline's results; and how the
    reference loads our factory checkpoint."""
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import ErnieMConfig, ErnieMForSequenceClassification, ErnieMModel, ErnieMTokenizer, pipeline

    assert transformers.__version__ == "4.56.2", transformers.__version__
    spec = json.loads((out / "spec.json").read_text())
    result: dict = {"tokenizers": {}, "models": {}, "zero_shot": []}

    for name, folder in spec["tokenizers"].items():
        tokenizer = ErnieMTokenizer.from_pretrained(folder)
        result["tokenizers"][name] = [tokenizer(text, pair)["input_ids"] for text, pair in spec["texts"]]

    tensors = {}
    for name, overrides in spec["models"].items():
        labels = {int(i): label for i, label in overrides.pop("id2label").items()}
        config = ErnieMConfig(**overrides, id2label=labels, label2id={label: i for i, label in labels.items()})
        classifier = randomize(ErnieMForSequenceClassification(config), seed=len(result["models"]))
        classifier.save_pretrained(out / name / "safetensors", safe_serialization=True)
        classifier.save_pretrained(out / name / "bin", safe_serialization=False)
        classifier.ernie_m.save_pretrained(out / name / "encoder_bin", safe_serialization=False)
        g = torch.Generator().manual_seed(7)
        lengths = torch.tensor([11, 6, 1, 9])
        ids = torch.randint(3, config.vocab_size, (len(lengths), int(lengths.max())), generator=g)
        mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
        ids = ids.masked_fill(mask == 0, PAD)
        with torch.no_grad():
            encoded = classifier.ernie_m(ids, attention_mask=mask)
            unmasked = classifier.ernie_m(ids)  # the reference masks pad ids itself
            tensors.update({
                f"{name}.input_ids": ids, f"{name}.attention_mask": mask,
                f"{name}.hidden": encoded.last_hidden_state, f"{name}.pooled": encoded.pooler_output,
                f"{name}.hidden_no_mask": unmasked.last_hidden_state,
                f"{name}.logits": classifier(ids, attention_mask=mask).logits,
            })
        result["models"][name] = {"folders": [str(out / name / k) for k in ("safetensors", "bin", "encoder_bin")]}

        tokenizer = ErnieMTokenizer.from_pretrained(spec["zero_shot_tokenizer"])
        classify = pipeline("zero-shot-classification", model=classifier, tokenizer=tokenizer, device="cpu")
        for case in spec["zero_shot"]:
            template = case.get("hypothesis_template", "This example is {}.")
            got = classify(case["text"], case["labels"], multi_label=case["multi_label"], hypothesis_template=template)
            pairs = [tokenizer(case["text"], template.format(label), return_tensors="pt") for label in case["labels"]]
            with torch.no_grad():  # one unpadded forward per pair, as the pipeline runs them
                logits = [classifier(**pair).logits[0].tolist() for pair in pairs]
            result["zero_shot"].append({"model": name, **case, "labels_out": got["labels"], "scores": got["scores"], "logits": logits})
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "outputs.safetensors")

    factory = spec["factory_checkpoint"]
    model, info = ErnieMForSequenceClassification.from_pretrained(factory, output_loading_info=True)
    ids = torch.tensor([ErnieMTokenizer.from_pretrained(factory)("Hello 你好", "This example is 2024.")["input_ids"]])
    with torch.no_grad():
        logits = model.eval()(ids).logits[0].tolist()
    result["factory"] = {"info": {k: sorted(map(str, v)) for k, v in info.items()}, "input_ids": ids[0].tolist(), "logits": logits}
    (out / "result.json").write_text(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
