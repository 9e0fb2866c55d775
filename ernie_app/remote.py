"""Chat through an OpenAI-compatible engine (vLLM, FastDeploy, SGLang serving ERNIE 4.5) instead of
local weights: one streaming `POST /v1/chat/completions` per turn, read back into the `Reply` the
local engine yields, so the chat tabs show both alike (statistics from the engine's usage).

Stop is checked at every streamed chunk and closes the HTTP stream, which the engines take as an
abort. An engine that is down, silent past the timeout or answering an HTTP error gives a user
message (ModelUnavailable, or UserError for a request it refused), never a traceback.
"""
from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from PIL import Image

from models.ernie4_5_vl_processor import VisionConfig
from models.media import MediaError, load_image

from .engine import Reply, Sampling, UserError
from .manager import ModelUnavailable
from .reasoning import THINK_CLOSE, THINK_OPEN
from .registry import VISION, ModelSpec

API_KEY_VARIABLE = "ERNIE_STUDIO_API_KEY"
TIMEOUT_VARIABLE = "ERNIE_STUDIO_REMOTE_TIMEOUT"
CONNECT_SECONDS = 5.0
DEFAULT_TIMEOUT_SECONDS = 120.0
NO_VIDEO = ("Videos are not sent to remote engines: ask a local VL model about the video, or attach "
            "still images in the Image tab.")
_served_ids: dict[str, str] = {}  # engine URL -> the model id its /v1/models lists first


def timeout_seconds() -> float:
    """How long an engine may stay silent (before its first chunk or between two) until the turn fails."""
    return float(os.environ.get(TIMEOUT_VARIABLE) or DEFAULT_TIMEOUT_SECONDS)


def image_data_url(path: str) -> str:
    """A PNG data URL of an image, scaled down to the VL processor's pixel limit when larger (the
    engine would resize it to that anyway), so that requests stay small."""
    try:
        image = load_image(path)
    except MediaError as error:
        raise UserError(str(error)) from None
    limit = VisionConfig().max_pixels
    if image.width * image.height > limit:
        scale = (limit / (image.width * image.height)) ** 0.5
        image = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def openai_message(message: dict) -> dict:
    """A model message (content text, or image / video / text parts) in OpenAI's chat format."""
    if isinstance(message["content"], str):
        return message
    parts = []
    for part in message["content"]:
        if part["type"] == "video":
            raise UserError(NO_VIDEO)
        parts.append({"type": "image_url", "image_url": {"url": image_data_url(part["image"])}} if part["type"] == "image" else part)
    return {"role": message["role"], "content": parts}


def request_body(model: str, messages: list[dict], sampling: Sampling, enable_thinking: bool | None = None) -> dict:
    """The chat-completions request: the conversation and the settings the user set; unset ones are
    left to the engine. top_k and repetition_penalty are vLLM's and FastDeploy's extra parameters;
    top_k 0 (off) is not sent, since not every engine takes 0."""
    body = {"model": model, "messages": [openai_message(m) for m in messages], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": sampling.max_new_tokens}
    optional = {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k or None,
                "repetition_penalty": sampling.repetition_penalty, "seed": sampling.seed,
                "stop": list(sampling.stop_strings) or None}
    body.update((key, value) for key, value in optional.items() if value is not None)
    if enable_thinking is not None:
        body["chat_template_kwargs"] = {"enable_thinking": bool(enable_thinking)}
    return body


def error_text(data: object, fallback: str) -> str:
    """The engine's own words for an error, shortened: OpenAI's {"error": {"message"}}, vLLM's
    {"message"}, FastAPI's {"detail"}, and FastDeploy's {"detail": {"message"}}."""
    while isinstance(data, dict):
        data = next((data[key] for key in ("error", "detail", "message") if data.get(key)), None)
    return " ".join(str(data or fallback).split())[:300]


def response_error(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        data = None
    return error_text(data, response.text or response.reason_phrase)


def check_status(spec: ModelSpec, response: httpx.Response) -> None:
    if response.is_success:
        return
    response.read()
    status, detail = response.status_code, response_error(response)
    if status in (401, 403):
        key = "refused the API key in" if os.environ.get(API_KEY_VARIABLE) else "wants an API key: set"
        raise ModelUnavailable(f"{spec.name}: the engine at {spec.source} {key} {API_KEY_VARIABLE} (HTTP {status}: {detail}).")
    if status in (400, 413, 422):
        raise UserError(f"{spec.name} refused the request (HTTP {status}): {detail}")
    raise ModelUnavailable(f"{spec.name}: the engine at {spec.source} answered HTTP {status}: {detail}")


@contextmanager
def engine_errors(spec: ModelSpec) -> Iterator[None]:
    """Transport failures as user messages naming the engine and what to check."""
    where = f"{spec.name}: the engine at {spec.source}"
    try:
        yield
    except httpx.ConnectTimeout:
        raise ModelUnavailable(f"{where} did not accept a connection within {CONNECT_SECONDS:g} s. Is it running?") from None
    except httpx.ConnectError:
        raise ModelUnavailable(f"{where} cannot be reached. Is it running, and is the URL right?") from None
    except httpx.TimeoutException:
        raise ModelUnavailable(f"{where} sent nothing for {timeout_seconds():g} s ({TIMEOUT_VARIABLE}). "
                               "Try again, or raise the timeout for long prompts.") from None
    except httpx.HTTPError:
        raise ModelUnavailable(f"{where} broke off the connection. Please try again.") from None


def client() -> httpx.Client:
    key = os.environ.get(API_KEY_VARIABLE)
    return httpx.Client(headers={"Authorization": f"Bearer {key}"} if key else {},
                        timeout=httpx.Timeout(timeout_seconds(), connect=CONNECT_SECONDS))


def served_model(spec: ModelSpec, http: httpx.Client) -> str:
    """The model id to request: the entry's `#served-id`, else the first id the engine's
    GET /v1/models lists (asked once per engine)."""
    if spec.served_id or spec.source in _served_ids:
        return spec.served_id or _served_ids[spec.source]
    response = http.get(f"{spec.source.rstrip('/')}/models")
    check_status(spec, response)
    try:
        served = response.json()["data"][0]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise ModelUnavailable(f"{spec.name}: the engine at {spec.source} lists no model at /models.") from None
    return _served_ids.setdefault(spec.source, served)


def chunks(spec: ModelSpec, response: httpx.Response) -> Iterator[dict]:
    """The JSON payloads of the server-sent events (`data: {...}` lines) up to `data: [DONE]`."""
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, comments, event names
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            raise ModelUnavailable(f"{spec.name}: the engine at {spec.source} streamed something that is not "
                                   "OpenAI-compatible JSON.") from None
        if "error" in chunk or chunk.get("object") == "error":
            raise ModelUnavailable(f"{spec.name}: the engine failed mid-reply: {error_text(chunk, data)}")
        yield chunk


def stop_reason(choice: dict) -> str:
    """An OpenAI finish_reason in the app's terms: "length" is max new tokens; "stop" is a stop
    sequence when the engine names one (vLLM's `stop_reason`), else the end of the answer."""
    if choice["finish_reason"] == "length":
        return "max_new_tokens"
    return "stop_string" if isinstance(choice.get("stop_reason"), str) else "eos"


def reply_text(reasoning: str, answer: str) -> str:
    """Reasoning the engine sent apart, marked up as a local thinking model writes it, which
    turns.render splits: `<think>reasoning</think>answer`."""
    return f"{THINK_OPEN}{reasoning}{THINK_CLOSE if answer else ''}{answer}" if reasoning else answer


def shows_reasoning(reply: Reply) -> bool:
    """Whether the reply holds reasoning sent apart (the engine runs a reasoning parser): the chat
    then shows it collapsed, whatever the model's name says."""
    return reply.text.startswith(THINK_OPEN)


def stream_remote(spec: ModelSpec, messages: list[dict], sampling: Sampling, cancel: threading.Event | None = None,
                  media_options: dict | None = None) -> Iterator[Reply]:
    """Yield the growing reply to `messages` from the engine `spec` names; the last one carries
    the stop reason and the engine's token counts."""
    reply, reasoning, answer, finished = Reply(), "", "", None
    # The VL templates think only when asked, as locally (encode_prompt); the text ones take no switch.
    thinking = (media_options or {}).get("enable_thinking", spec.thinking) if spec.task == VISION else None
    with engine_errors(spec), client() as http:
        body = request_body(served_model(spec, http), messages, sampling, thinking)
        with http.stream("POST", f"{spec.source.rstrip('/')}/chat/completions", json=body) as response:
            check_status(spec, response)
            for chunk in chunks(spec, response):
                if cancel is not None and cancel.is_set():
                    finished = "cancelled"
                    break  # leaving the block closes the stream: the engine aborts the request
                choice = (chunk.get("choices") or [{}])[0]  # one choice: n is never sent
                delta = choice.get("delta") or {}
                thought = delta.get("reasoning_content") or delta.get("reasoning") or ""  # FastDeploy's, vLLM's name
                said = delta.get("content") or ""
                if choice.get("finish_reason"):
                    finished = stop_reason(choice)
                if chunk.get("usage"):
                    reply.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
                    reply.new_tokens = chunk["usage"].get("completion_tokens", reply.new_tokens)
                elif thought or said:
                    reply.new_tokens += 1  # about a token a chunk, until the engine's usage counts them
                if thought or said:
                    reasoning, answer = reasoning + thought, answer + said
                    reply.last_token_at = time.perf_counter()
                    reply.first_token_at = reply.first_token_at or reply.last_token_at
                    reply.text = reply_text(reasoning, answer)
                    yield reply
    if finished is None:
        raise ModelUnavailable(f"{spec.name}: the engine at {spec.source} ended the reply without saying why. Please try again.")
    reply.stop_reason = finished
    yield reply
