"""The Video tab: questions about a video to the ERNIE 4.5 VL models (frames sampled with PyAV and
shown as the model saw them), and the `/video` API."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from .conversation import Controls, Limits, api_stream, build_conversation
from .manager import ModelManager
from .registry import VISION
from .uploads import check_upload
from .zerogpu import gpu

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EXAMPLES = [{"text": "What happens in this video, and when?", "files": [str(ASSETS / "clock.mp4")]}]


def build_video_tab(manager: ModelManager, default_model: str, limits: Limits, concurrency_limit: int) -> None:
    """Render the Video tab inside the current Blocks context, with its /video API."""
    controls = build_conversation(manager, default_model, limits, concurrency_limit, "video", EXAMPLES,
                                  "Attach a video and ask about it…",
                                  "Attach a video and ask about it; the frames the model saw show below the input.")
    build_video_api(controls, concurrency_limit)


def build_video_api(controls: Controls, concurrency_limit: int) -> None:
    """/video: a video file (or none, to ask more about the earlier one) and a question first, every
    setting optional, then fps and max_frames; each client session keeps its conversation."""
    @gpu
    def video(video: str | None, question: str, history: list[dict], model_name: str, system_prompt: str = "",
              max_new_tokens: int = 512, temperature: float | None = None, top_p: float | None = None,
              top_k: int | None = None, repetition_penalty: float | None = None, seed: int | None = None,
              stop_sequences: str = "", fps: float = 2.0, max_frames: int = 180, request: gr.Request = None):
        """Ask an ERNIE 4.5 VL model about a video; streams the reply as chat messages."""
        check_upload(video, controls.session.limits.max_upload_bytes, "/video")
        values = (max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop_sequences)
        content = [{"path": video}, question] if video else question
        yield from api_stream(controls.session, history, content, model_name, system_prompt, values, "/video",
                              request and request.session_hash, {"fps": fps, "max_frames": max_frames})

    api_history = gr.State([])
    gr.Button(visible=False).click(
        video, [gr.File(type="filepath", file_types=["video"], visible=False), gr.Textbox(visible=False), api_history,
                controls.model, controls.system_prompt, *controls.settings, *controls.sampling_of_frames],
        [gr.JSON(visible=False), api_history], api_name="video", concurrency_limit=concurrency_limit,
        concurrency_id=VISION, postprocess=False,
    )
