"""The Image tab: questions about one or more images to the ERNIE 4.5 VL models, and the `/image` API."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from .conversation import Controls, Limits, api_stream, build_conversation
from .manager import ModelManager
from .registry import VISION
from .uploads import check_upload
from .zerogpu import gpu

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EXAMPLES = [
    {"text": "What is shown in this picture?", "files": [str(ASSETS / "shapes.png")]},
    {"text": "这张图表说明了什么？", "files": [str(ASSETS / "chart.png")]},
    {"text": "What differs between the two pictures?", "files": [str(ASSETS / "shapes.png"), str(ASSETS / "chart.png")]},
]


def build_image_tab(manager: ModelManager, default_model: str, limits: Limits, concurrency_limit: int) -> None:
    """Render the Image tab inside the current Blocks context, with its /image API."""
    controls = build_conversation(manager, default_model, limits, concurrency_limit, "image", EXAMPLES,
                                  "Attach images and ask about them…",
                                  "Attach one or more images and ask about them; follow-up questions see them too.")
    build_image_api(controls, concurrency_limit)


def build_image_api(controls: Controls, concurrency_limit: int) -> None:
    """/image: an image file (or none, to ask more about the earlier ones) and a question first, every
    setting optional; each client session keeps its conversation and its images."""
    @gpu
    def image(image: str | None, question: str, history: list[dict], model_name: str, system_prompt: str = "",
              max_new_tokens: int = 512, temperature: float | None = None, top_p: float | None = None,
              top_k: int | None = None, repetition_penalty: float | None = None, seed: int | None = None,
              stop_sequences: str = "", request: gr.Request = None):
        """Ask an ERNIE 4.5 VL model about an image; streams the reply as chat messages."""
        check_upload(image, controls.session.limits.max_upload_bytes, "/image")
        values = (max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop_sequences)
        content = [{"path": image}, question] if image else question
        yield from api_stream(controls.session, history, content, model_name, system_prompt, values, "/image",
                              request and request.session_hash)

    api_history = gr.State([])
    gr.Button(visible=False).click(
        image, [gr.File(type="filepath", file_types=["image"], visible=False), gr.Textbox(visible=False), api_history,
                controls.model, controls.system_prompt, *controls.settings],
        [gr.JSON(visible=False), api_history], api_name="image", concurrency_limit=concurrency_limit,
        concurrency_id=VISION, postprocess=False,
    )
