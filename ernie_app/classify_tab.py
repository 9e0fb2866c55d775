"""The Multilingual classification tab: zero-shot labels for text in ~100 languages through an
ErnieM NLI checkpoint, and the `/classify` API."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from models import zero_shot_classify

from .engine import UserError
from .manager import ModelManager
from .registry import CLASSIFY, models_for
from .turns import MAX_MESSAGE_CHARS, refuse
from .zerogpu import gpu

MAX_LABELS = 64  # one batched forward pass per request: beyond this, split the request
MAX_LABEL_CHARS = 200
# Hypothesis templates by language; "{}" is where the label goes. An NLI model reads the
# hypothesis in any language, but one in the text's language tends to score better.
TEMPLATES = {
    "English": "This example is {}.",
    "中文": "这个例子是关于{}的。",
    "Español": "Este ejemplo es {}.",
    "Français": "Cet exemple est {}.",
    "Deutsch": "Dieses Beispiel ist {}.",
    "العربية": "هذا المثال عن {}.",
    "Русский": "Этот пример о {}.",
    "हिन्दी": "यह उदाहरण {} के बारे में है।",
    "日本語": "この例は{}についてです。",
}
EXAMPLES = [
    ["The new phone's battery lasts two full days and the camera is superb.", "technology, sports, politics, cooking", "English"],
    ["国家队昨晚在决赛中以二比一战胜对手，夺得冠军。", "体育, 经济, 科技, 娱乐", "中文"],
    ["ارتفعت أسعار النفط بعد قرار خفض الإنتاج.", "اقتصاد, رياضة, طقس, فن", "العربية"],
    ["Завтра в Москве ожидается сильный снегопад и мороз.", "погода, спорт, политика, кино", "Русский"],
    ["भारत ने चंद्रमा के दक्षिणी ध्रुव पर अपना यान सफलतापूर्वक उतारा।", "विज्ञान, खेल, राजनीति, संगीत", "हिन्दी"],
    ["このラーメン屋のスープは濃厚でとても美味しい。", "料理, スポーツ, 政治, 天気", "日本語"],
    ["El gobierno aprobó una nueva ley de educación ayer.", "política, deportes, cocina, tecnología", "Español"],
]


def parse_labels(text: str) -> tuple[list[str], list[str]]:
    """Comma-separated labels (ASCII or full-width/ideographic commas, or one per line), blanks
    dropped; duplicates merged, case-insensitively. Returns (labels, merged duplicates)."""
    for comma in ("，", "、", "،", "\n"):
        text = text.replace(comma, ",")
    labels, seen, duplicates = [], set(), []
    for label in (part.strip() for part in text.split(",")):
        if not label:
            continue
        if label.casefold() in seen:
            duplicates.append(label)
            continue
        seen.add(label.casefold())
        labels.append(label)
    return labels, duplicates


def check_request(text: str, labels_text: str, template: str) -> tuple[list[str], list[str]]:
    """The labels of a request, or a UserError saying what to fix."""
    if not (text or "").strip():
        raise UserError("Please type a text to classify.")
    if len(text) > MAX_MESSAGE_CHARS:
        raise UserError(f"That text has {len(text):,} characters; the limit is {MAX_MESSAGE_CHARS:,}.")
    labels, duplicates = parse_labels(labels_text or "")
    if not labels:
        raise UserError("Please give at least one label, separated by commas.")
    if len(labels) > MAX_LABELS:
        raise UserError(f"{len(labels)} labels is too many; the limit is {MAX_LABELS} per request.")
    if any(len(label) > MAX_LABEL_CHARS for label in labels):
        raise UserError(f"Labels can have at most {MAX_LABEL_CHARS} characters.")
    template = template or ""
    if template.count("{}") != 1 or template.replace("{}", "").count("{") or template.replace("{}", "").count("}"):
        raise UserError("The hypothesis template needs exactly one {} where the label goes, and no other braces.")
    return labels, duplicates


class Classifier:
    """Zero-shot classification for the tab and the API, on models loaded by the manager."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    def classify(self, text: str, labels_text: str, template: str, multi_label: bool, model_name: str) -> tuple[dict, list[str]]:
        """(result as transformers' pipeline returns it, plus `truncated`; notes for the page)."""
        labels, duplicates = check_request(text, labels_text, template)
        if model_name not in self.manager.registry or self.manager.registry[model_name].task != CLASSIFY:
            raise UserError(f"Unknown classification model {model_name!r}. Choose one of: "
                            f"{', '.join(models_for(self.manager.registry, CLASSIFY))}.")
        with self.manager.use(model_name) as loaded, loaded.slots:
            try:
                result = zero_shot_classify(loaded.model, loaded.tokenizer, text, labels, template, bool(multi_label))
            except ValueError as error:  # a label whose hypothesis leaves no room for the text
                raise UserError(f"Could not classify: {error}") from None
        notes = []
        if result.truncated:
            notes.append("The text was longer than the model reads; only its beginning was classified.")
        if duplicates:
            notes.append(f"Duplicate labels merged: {', '.join(duplicates)}.")
        scores = {"sequence": text, "labels": result.labels, "scores": result.scores, "truncated": result.truncated}
        return scores, notes


def build_classify_tab(manager: ModelManager, concurrency_limit: int) -> None:
    """Render the Classification tab inside the current Blocks context."""
    classifier = Classifier(manager)
    names = models_for(manager.registry, CLASSIFY)
    with gr.Row():
        with gr.Column():
            model = gr.Dropdown([(manager.registry[n].label, n) for n in names], value=names[0], label="Model")
            text = gr.Textbox(label="Text (any language)", lines=4, placeholder="Paste a text to classify…")
            labels = gr.Textbox(label="Labels (comma separated, any language)", placeholder="sports, politics, technology")
            with gr.Row():
                language = gr.Dropdown(list(TEMPLATES), value="English", label="Template language", scale=1)
                template = gr.Textbox(TEMPLATES["English"], label="Hypothesis template ({} = the label)", scale=2)
            multi_label = gr.Checkbox(False, label="Several labels can be true (multi-label)")
            button = gr.Button("Classify", variant="primary")
        with gr.Column():
            top = gr.Label(label="Scores", num_top_classes=10)
            chart = gr.BarPlot(x="label", y="score", title="Scores", y_lim=[0, 1], sort="-y", label="Chart")
            notes = gr.Markdown()
    language.change(lambda name: TEMPLATES[name], language, template, api_visibility="private")
    gr.Examples(EXAMPLES, [text, labels, language], label="Examples in several languages")

    @gpu
    def run(text_value, labels_value, template_value, multi, model_name):
        try:
            result, remarks = classifier.classify(text_value, labels_value, template_value, multi, model_name)
        except Exception as error:
            gr.Warning(refuse(error, "classification"))
            return gr.skip(), gr.skip(), gr.skip()
        frame = pd.DataFrame({"label": result["labels"], "score": result["scores"]})
        return dict(zip(result["labels"], result["scores"])), frame, "\n\n".join(f"ℹ️ {r}" for r in remarks)

    gr.on([button.click, text.submit, labels.submit], run, [text, labels, template, multi_label, model],
          [top, chart, notes], concurrency_limit=concurrency_limit, concurrency_id="classify", api_visibility="private")

    # /classify: text and labels first; template, multi-label and model optional.
    api_text, api_labels = gr.Textbox(visible=False), gr.Textbox(visible=False)
    api_result = gr.JSON(visible=False)

    @gpu
    def classify(text: str, labels: str, hypothesis_template: str = TEMPLATES["English"], multi_label: bool = False,
                 model_name: str = names[0]) -> dict:
        """Zero-shot classification; returns {sequence, labels, scores (best first), truncated}."""
        try:
            return classifier.classify(text, labels, hypothesis_template, multi_label, model_name)[0]
        except Exception as error:
            raise gr.Error(refuse(error, "classification"), print_exception=False) from None

    gr.Button(visible=False).click(classify, [api_text, api_labels, template, multi_label, model], api_result,
                                   api_name="classify", concurrency_limit=concurrency_limit,
                                   concurrency_id="classify", postprocess=False)

