"""Models served by an OpenAI-compatible engine: a fake engine in a thread on 127.0.0.1 records each
request and streams server-sent events; the app parses the entries, sends the user's settings,
streams the reply with the engine's usage, stops on Stop and explains every failure."""
from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image
from gradio_client import Client
from gradio_client.exceptions import AppError

import app as studio
from ernie_app.classify_tab import Classifier
from ernie_app.conversation import ChatSession, Limits
from ernie_app.engine import Sampling, UserError
from ernie_app.manager import ModelManager, ModelUnavailable
from ernie_app.registry import CHAT, CLASSIFY, VISION, build_registry, parse_model_entries
from ernie_app import remote
from ernie_app.remote import NO_VIDEO, stream_remote
from ernie_app.turns import Turn, conversation
from models.ernie4_5_vl_processor import VisionConfig
from test_app_e2e import free_port

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SERVED = "baidu/ERNIE-4.5-21B-A3B-PT"
WORDS = ["The", " sea", " is", " calm", "."]


def sse_chunks(words=WORDS, finish="stop", usage=(12, 9), reasoning=(), reasoning_field="reasoning_content", **choice):
    """An engine's stream: role, reasoning, content, finish and usage chunks (its token counts
    differ from the chunk count, as a real engine's may)."""
    def delta(**fields):
        return {"choices": [{"index": 0, "delta": fields, "finish_reason": None}]}

    chunks = [delta(role="assistant"), *(delta(**{reasoning_field: r}) for r in reasoning), *(delta(content=w) for w in words)]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish, **choice}]})
    chunks.append({"choices": [], "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                                            "total_tokens": sum(usage)}})
    return chunks


class Engine(ThreadingHTTPServer):
    """A fake vLLM: GET /v1/models lists SERVED; POST /v1/chat/completions records the request, then
    streams `chunks` (`delay` s apart, after `wait` s) or answers `status` with an error body."""

    daemon_threads, block_on_close = True, False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), EngineHandler)
        self.requests: list[tuple[str, dict, dict | None]] = []
        self.chunks, self.delay, self.wait, self.status = sse_chunks(), 0.0, 0.0, 200
        self.sent, self.disconnected = 0, threading.Event()
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def bodies(self) -> list[dict]:
        return [body for path, _, body in self.requests if path == "/v1/chat/completions"]


class EngineHandler(BaseHTTPRequestHandler):
    server: Engine

    def log_message(self, *args) -> None:
        pass

    def answer(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.server.requests.append((self.path, dict(self.headers), None))
        self.answer(200, {"object": "list", "data": [{"id": SERVED, "object": "model"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        engine = self.server
        engine.requests.append((self.path, dict(self.headers), body))
        time.sleep(engine.wait)
        if engine.status != 200:
            self.answer(engine.status, {"error": {"message": f"engine says {engine.status}", "code": engine.status}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        try:
            for chunk in [*engine.chunks, "[DONE]"]:
                time.sleep(engine.delay)
                self.wfile.write(f"data: {chunk if chunk == '[DONE]' else json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
                engine.sent += 1
        except (BrokenPipeError, ConnectionResetError):
            engine.disconnected.set()


@pytest.fixture()
def engine(monkeypatch):
    monkeypatch.setattr(remote, "_served_ids", {})  # a port an earlier engine had is a new engine
    server = Engine()
    yield server
    server.shutdown()
    server.server_close()


def spec_for(url: str, name: str = "Remote"):
    return parse_model_entries(f"{name}={url}")[0]


def run(spec, messages=None, sampling=None, **kwargs):
    """Every update's text, and the final reply."""
    texts, reply = [], None
    for reply in stream_remote(spec, messages or [{"role": "user", "content": "Hi"}], sampling or Sampling(8), **kwargs):
        texts.append(reply.text)
    return texts, reply


def test_entries_name_engines_and_guess_their_tab():
    bare, named, vl, builtin, local = parse_model_entries(
        "http://gpu:8000/v1#baidu/ERNIE-4.5-21B-A3B-Thinking, Remote=https://h/v1?key=a=b,"
        "vl=http://h:1/v1#baidu/ERNIE-4.5-VL-28B-A3B-PT, ERNIE-4.5-0.3B-PT=http://h:2/v1, mine=/models/ernie")
    assert (bare.name, bare.source, bare.served_id, bare.thinking) == ("ERNIE-4.5-21B-A3B-Thinking", "http://gpu:8000/v1",
                                                                        "baidu/ERNIE-4.5-21B-A3B-Thinking", True)
    assert (named.name, named.source, named.served_id, named.task) == ("Remote", "https://h/v1?key=a=b", None, CHAT)
    assert vl.task == VISION and builtin.source == "http://h:2/v1" and builtin.remote
    assert not local.remote and local.source == "/models/ernie"


def test_the_served_id_comes_from_v1_models_or_the_entry(engine):
    run(spec_for(engine.url))
    run(spec_for(engine.url))
    assert [path for path, _, _ in engine.requests].count("/v1/models") == 1  # asked once per engine
    run(spec_for(f"{engine.url}#my-served-name", "Other"))
    assert [body["model"] for body in engine.bodies()] == [SERVED, SERVED, "my-served-name"]


def test_the_request_carries_the_conversation_and_the_users_settings(engine, monkeypatch):
    monkeypatch.setenv("ERNIE_STUDIO_API_KEY", "sekret")
    history = [{"role": "user", "content": "First?"}, {"role": "assistant", "content": "One."}]
    sampling = Sampling(max_new_tokens=33, temperature=0.4, top_p=0.9, top_k=20, repetition_penalty=1.1, seed=7,
                        stop_strings=("END", "\n\n"))
    run(spec_for(engine.url), conversation(history, "Be brief.", "Second?"), sampling)
    (path, headers, body), = [r for r in engine.requests if r[0] == "/v1/chat/completions"]
    assert headers["Authorization"] == "Bearer sekret"
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, *history, {"role": "user", "content": "Second?"}]
    assert {k: body[k] for k in ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop")} == {
        "max_tokens": 33, "temperature": 0.4, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1, "seed": 7,
        "stop": ["END", "\n\n"]}
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_unset_settings_are_left_to_the_engine(engine):
    run(spec_for(engine.url), sampling=Sampling(max_new_tokens=8, top_k=0))
    (_, headers, body), = [r for r in engine.requests if r[0] == "/v1/chat/completions"]
    assert set(body) == {"model", "messages", "stream", "stream_options", "max_tokens"}
    assert "Authorization" not in headers


def test_the_reply_streams_and_ends_with_the_engines_counts(engine):
    texts, reply = run(spec_for(engine.url))
    assert texts[:-1] == ["".join(WORDS[:i]) for i in range(1, len(WORDS) + 1)]  # one update per chunk, growing
    assert (reply.text, reply.prompt_tokens, reply.new_tokens, reply.stop_reason) == ("".join(WORDS), 12, 9, "eos")
    assert reply.time_to_first_token is not None and reply.tokens_per_second is not None


@pytest.mark.parametrize(("finish", "extra", "expected"), [("length", {}, "max_new_tokens"),
                                                           ("stop", {"stop_reason": "END"}, "stop_string"),
                                                           ("stop", {"stop_reason": None}, "eos")])
def test_finish_reasons_map_to_the_apps_stop_reasons(engine, finish, extra, expected):
    engine.chunks = sse_chunks(finish=finish, **extra)
    assert run(spec_for(engine.url))[1].stop_reason == expected


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])  # FastDeploy's name, newer vLLM's
def test_reasoning_sent_apart_shows_collapsed_even_for_a_model_not_named_thinking(engine, field):
    engine.chunks = sse_chunks(words=["Calm", "."], reasoning=["Look", " at waves."], reasoning_field=field)
    registry = build_registry([spec_for(engine.url)], include_defaults=False)
    turn = Turn([{"role": "user", "content": "Sea?"}], thinking=False)
    *_, shown = ChatSession(ModelManager(registry), Limits(max_context=4096)).stream(turn, "Sea?", "Remote", "", (16, None, None, None, None, None, ""))
    reasoning, answer, statistics = shown[1:]
    assert (reasoning["metadata"]["title"], reasoning["content"], answer["content"]) == ("💭 Reasoning", "Look at waves.", "Calm.")
    assert statistics["metadata"]["title"].startswith("⚡")


def test_stop_closes_the_stream_within_a_chunk(engine):
    engine.chunks, engine.delay = sse_chunks(words=["word "] * 300), 0.01
    cancel, count = threading.Event(), 0
    for reply in stream_remote(spec_for(engine.url), [{"role": "user", "content": "Go on"}], Sampling(512), cancel):
        count += 1
        if count == 3:
            cancel.set()
    assert reply.stop_reason == "cancelled" and count == 4  # the three replies, then the stopped one
    assert engine.disconnected.wait(10) and engine.sent < 20  # the engine saw the client go, long before its end


def test_a_dead_engine_is_a_readable_error():
    port = free_port()  # nothing listens there
    with pytest.raises(ModelUnavailable, match=f"Remote: the engine at http://127.0.0.1:{port}/v1 cannot be reached"):
        run(spec_for(f"http://127.0.0.1:{port}/v1"))


@pytest.mark.parametrize(("status", "key", "error", "expected"), [
    (500, None, ModelUnavailable, "answered HTTP 500: engine says 500"),
    (401, None, ModelUnavailable, "wants an API key: set ERNIE_STUDIO_API_KEY"),
    (401, "wrong", ModelUnavailable, "refused the API key in ERNIE_STUDIO_API_KEY"),
    (400, None, UserError, r"Remote refused the request \(HTTP 400\): engine says 400"),
])
def test_http_errors_are_readable(engine, monkeypatch, status, key, error, expected):
    if key:
        monkeypatch.setenv("ERNIE_STUDIO_API_KEY", key)
    engine.status = status
    with pytest.raises(error, match=expected):
        run(spec_for(f"{engine.url}#served"))


@pytest.mark.parametrize("body", [{"error": {"message": "too long", "code": 400}}, {"object": "error", "message": "too long"},
                                  {"detail": {"object": "error", "message": "too long"}}, {"detail": "too long"}])
def test_the_engines_words_are_found_in_every_error_shape(body):  # OpenAI's, vLLM's, FastDeploy's, FastAPI's
    assert remote.error_text(body, "fallback") == "too long"
    assert remote.error_text({"unexpected": 1}, "Internal  Server\nError") == "Internal Server Error"


def test_a_silent_engine_times_out_with_a_message(engine, monkeypatch):
    monkeypatch.setenv("ERNIE_STUDIO_REMOTE_TIMEOUT", "0.3")
    engine.wait = 2.0
    with pytest.raises(ModelUnavailable, match=r"sent nothing for 0.3 s \(ERNIE_STUDIO_REMOTE_TIMEOUT\)"):
        run(spec_for(f"{engine.url}#served"))


def test_images_go_as_data_urls_within_the_pixel_limit_and_videos_are_refused(engine, tmp_path):
    spec = spec_for(f"{engine.url}#baidu/ERNIE-4.5-VL-28B-A3B-PT", "vl")
    huge = tmp_path / "huge.png"
    Image.new("RGB", (4000, 3000), (90, 120, 200)).save(huge)
    parts = [{"type": "image", "image": str(ASSETS / "shapes.png")}, {"type": "image", "image": str(huge)},
             {"type": "text", "text": "Compare them."}]
    run(spec, [{"role": "user", "content": parts}], media_options={"enable_thinking": True})
    body, = engine.bodies()
    first, second, text = body["messages"][0]["content"]
    sizes = [Image.open(io.BytesIO(base64.b64decode(part["image_url"]["url"].removeprefix("data:image/png;base64,")))).size
             for part in (first, second)]
    assert sizes[0] == Image.open(ASSETS / "shapes.png").size
    assert sizes[1][0] * sizes[1][1] <= VisionConfig().max_pixels and abs(sizes[1][0] / sizes[1][1] - 4 / 3) < 0.01
    assert text == {"type": "text", "text": "Compare them."} and body["chat_template_kwargs"] == {"enable_thinking": True}
    with pytest.raises(UserError, match=NO_VIDEO):
        run(spec, [{"role": "user", "content": [{"type": "video", "video": str(ASSETS / "clock.mp4")}]}])
    assert len(engine.bodies()) == 1


def test_classification_refuses_a_remote_model_and_calls_no_one(engine):
    spec = spec_for(engine.url, "ernie-m-remote")
    assert spec.task == CLASSIFY
    classifier = Classifier(ModelManager(build_registry([spec], include_defaults=False)))
    with pytest.raises(ModelUnavailable, match="only the Chat, Image and Video tabs"):
        classifier.classify("Some text", "a, b", "This is {}.", False, spec.name)
    assert engine.requests == []


def test_chat_api_end_to_end_through_the_app(engine):
    server = studio.create_app(studio.parse_args(["--models", f"Remote={engine.url}"]))
    server.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(server.local_url, verbose=False)
        first = client.predict("Hello", "Remote", "You are terse.", 16, 0.5, api_name="/chat")
        assert [m["content"] for m in first if not m["metadata"]] == ["".join(WORDS)]
        assert first[-1]["metadata"]["title"].endswith("9 tokens · end of answer")
        client.predict("Again", "Remote", "You are terse.", 16, 0.5, api_name="/chat")
        bodies = engine.bodies()
        assert (bodies[0]["max_tokens"], bodies[0]["temperature"]) == (16, 0.5)
        assert [m["content"] for m in bodies[1]["messages"]] == ["You are terse.", "Hello", "".join(WORDS), "Again"]
        engine.status = 500
        with pytest.raises(AppError, match="answered HTTP 500"):
            client.predict("Fail?", "Remote", api_name="/chat")
    finally:
        server.close()
