"""End to end: the real Gradio server on 127.0.0.1 in demo mode, driven through gradio_client."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image
from gradio import processing_utils
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from ernie_app.conversation import Limits
from ernie_app.manager import ModelManager
from ernie_app.registry import DEFAULT_MODELS
from ernie_app.turns import SERVER_FAULT
from ernie_app.ui import build_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(demo_registry, demo_names):
    manager = ModelManager(demo_registry, max_concurrency=4)
    app = build_app(manager, demo_names[0], notice="Demo mode", concurrency_limit=8)
    app.queue(max_size=32)
    app.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield app, manager
    app.close()


@pytest.fixture()
def client(server):
    """A fresh client: the /chat endpoint keeps each client session's conversation."""
    app, _ = server
    return Client(app.local_url, verbose=False)


def answer(messages: list[dict]) -> str:
    return next(m["content"] for m in messages if not (m.get("metadata") or {}).get("title"))


def stats(messages: list[dict]) -> str:
    return next(m["metadata"]["title"] for m in messages if (m.get("metadata") or {}).get("title", "").startswith("⚡"))


def test_conversation_continues_within_a_client_session(client, demo_names):
    first = client.predict("Remember me", demo_names[0], "", 10, 0.0, api_name="/chat")
    again = client.predict("Remember me", demo_names[0], "", 10, 0.0, api_name="/chat")
    fresh = Client(client.src, verbose=False).predict("Remember me", demo_names[0], "", 10, 0.0, api_name="/chat")
    assert answer(fresh) == answer(first)
    assert answer(again) != answer(first)  # the second turn saw the first in its prompt


def test_streamed_reply(client, demo_names):
    job = client.submit("Hello, who are you?", demo_names[0], "", 40, 0.0, api_name="/chat")
    updates = list(job)
    assert len(updates) > 3  # streamed, not one final answer
    texts = [answer(u) for u in updates if any(not (m.get("metadata") or {}).get("title") for m in u)]
    assert all(later.startswith(earlier.rstrip("…")) for earlier, later in zip(texts, texts[1:]))
    final = updates[-1]
    assert "tok/s" in stats(final) and "tokens" in stats(final)


def test_thinking_model_shows_collapsed_reasoning(client, demo_names):
    final = client.predict("Think about it", demo_names[2], "", 20, 0.0, api_name="/chat")
    reasoning = [m for m in final if (m.get("metadata") or {}).get("title") == "💭 Reasoning"]
    assert len(reasoning) == 1 and reasoning[0]["metadata"]["status"] == "done"


def test_three_concurrent_chats(server, demo_names):
    app, _ = server
    questions = ["first question", "第二个问题", "third 🎉"]

    def chat(question):
        return Client(app.local_url, verbose=False).predict(question, demo_names[1], "", 30, 0.0, api_name="/chat")

    with ThreadPoolExecutor(3) as pool:
        finals = list(pool.map(chat, questions))
    alone = chat(questions[1])
    assert all(stats(f) for f in finals)
    # Concurrency does not mix conversations. The demo model runs in bf16, where a batched step
    # rounds differently from a step alone (BENCHMARKS.md, drift) and near-flat random logits
    # can then part after some tokens: the replies must agree on their start, and differ.
    assert answer(finals[1])[:5] == answer(alone)[:5]
    assert len({answer(f) for f in finals}) == 3


def test_stop_ends_generation(client, server, demo_names, monkeypatch):
    _, manager = server
    steps = slow_step_counter(manager.get(demo_names[0]), monkeypatch)
    job = client.submit("Write forever", demo_names[0], "", 4096, 0.0, api_name="/chat")
    wait_for(lambda: len(steps) >= 5)
    job.cancel()
    assert_generation_stopped(steps)
    assert stats(client.predict("still alive?", demo_names[0], "", 8, 0.0, api_name="/chat"))


def slow_step_counter(loaded, monkeypatch) -> list[float]:
    """Record every forward pass of `loaded` (and slow it, so a long reply is still running):
    the batched steps and the plain forward of a step with one decoding request."""
    steps = []
    for method in ("forward_step", "forward"):
        original = getattr(loaded.model, method)

        def counting(*args, original=original, **kwargs):
            steps.append(time.perf_counter())
            time.sleep(0.02)
            return original(*args, **kwargs)

        monkeypatch.setattr(loaded.model, method, counting)
    return steps


def wait_for(condition, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert condition()


def assert_generation_stopped(steps: list[float]) -> None:
    """No decode step for a whole second, soon after the stop (generous for a loaded machine) and
    long before the 4096-token reply could have finished."""
    deadline = time.monotonic() + 15
    while True:
        count = len(steps)
        time.sleep(1.0)
        if len(steps) == count or time.monotonic() > deadline:
            break
    assert len(steps) == count < 4096


def test_client_that_goes_away_stops_generation(server, demo_names, monkeypatch):
    app, manager = server
    steps = slow_step_counter(manager.get(demo_names[0]), monkeypatch)
    script = (
        "import sys, time\n"
        "from gradio_client import Client\n"
        f"job = Client({app.local_url!r}, verbose=False).submit('Write forever', {demo_names[0]!r}, '', 4096, 0.0, api_name='/chat')\n"
        "time.sleep(60)\n"
    )
    browser = subprocess.Popen([sys.executable, "-c", script])
    try:
        wait_for(lambda: len(steps) >= 5)
    finally:
        browser.kill()  # the tab is closed: its connection drops without a word
        browser.wait()
    assert_generation_stopped(steps)


@pytest.mark.parametrize(
    ("message", "expected"),
    [("", "Please type a message"), ("   \n ", "Please type a message"), ("a" * 100_000, "context")],
)
def test_bad_messages_get_clear_errors(client, demo_names, message, expected):
    with pytest.raises(AppError, match=expected):
        client.predict(message, demo_names[0], api_name="/chat")
    assert stats(client.predict("hello again", demo_names[0], "", 8, 0.0, api_name="/chat"))


def test_bad_settings_and_unknown_model(client, demo_names):
    with pytest.raises(AppError, match="no-such-model"):
        client.predict("hi", "no-such-model", api_name="/chat")
    with pytest.raises(AppError, match="less than minimum"):
        client.predict("hi", demo_names[0], "", 0, api_name="/chat")
    assert stats(client.predict("fine again", demo_names[0], "", 8, 0.0, api_name="/chat"))


def test_demo_models_keep_the_real_names(client, demo_names):
    assert demo_names == [m.name for m in DEFAULT_MODELS]  # an API script works in both modes
    assert stats(client.predict("hi", DEFAULT_MODELS[0].name, "", 4, 0.0, api_name="/chat"))


@pytest.mark.parametrize(("seed", "expected"), [(2**70, "Seed must be"), (-7, "Seed must be")])
def test_out_of_range_seed_is_refused_by_name(client, demo_names, seed, expected):
    with pytest.raises(AppError, match=expected):
        client.predict("hi", demo_names[0], "", 8, 1.0, 1.0, 0, 1.0, seed, api_name="/chat")
    assert stats(client.predict("hi", demo_names[0], "", 4, 1.0, 1.0, 0, 1.0, 2**63 - 1, api_name="/chat"))


def test_refusals_log_one_line_and_faults_name_no_exception_class(client, server, demo_names, monkeypatch, capfd, caplog):
    with caplog.at_level("INFO", logger="ernie_app"), pytest.raises(AppError, match="Please type a message"):
        client.predict("  ", demo_names[0], api_name="/chat")
    assert [r.getMessage() for r in caplog.records if "refused" in r.getMessage()] == ["/chat refused: Please type a message."]
    assert "Traceback" not in capfd.readouterr().err

    _, manager = server

    def broken_forward(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(manager.get(demo_names[0]).model, "forward_step", broken_forward)
    with pytest.raises(AppError) as failure:
        client.predict("hi", demo_names[0], "", 8, 0.0, api_name="/chat")
    assert str(failure.value) == SERVER_FAULT  # the log has the details; the user gets no class names
    monkeypatch.undo()
    assert stats(client.predict("fine again", demo_names[0], "", 8, 0.0, api_name="/chat"))


@pytest.mark.parametrize(
    ("text", "labels"),
    [("国家队昨晚在决赛中以二比一战胜对手。", "体育，经济，科技"),
     ("ارتفعت أسعار النفط بعد قرار خفض الإنتاج.", "اقتصاد, رياضة, طقس"),
     ("El gobierno aprobó una nueva ley de educación.", "política, deportes, cocina, tecnología")],
)
def test_classify_api_scores_every_label(client, server, demo_registry, text, labels):
    from models import zero_shot_classify

    _, manager = server
    name = next(n for n, spec in demo_registry.items() if spec.task == "classify")
    result = client.predict(text, labels, api_name="/classify")
    given = [label.strip() for label in labels.replace("，", ",").split(",")]
    assert sorted(result["labels"]) == sorted(given) and result["truncated"] is False
    assert result["scores"] == sorted(result["scores"], reverse=True) and sum(result["scores"]) == pytest.approx(1, abs=1e-5)
    loaded = manager.get(name)
    direct = zero_shot_classify(loaded.model, loaded.tokenizer, text, given)
    assert result["labels"] == direct.labels and result["scores"] == pytest.approx(direct.scores, abs=1e-6)
    multi = client.predict(text, labels, "This text is about {}.", True, api_name="/classify")
    assert all(0 <= s <= 1 for s in multi["scores"]) and sum(multi["scores"]) != pytest.approx(1, abs=1e-3)


@pytest.mark.parametrize(
    ("text", "labels", "template", "expected"),
    [("", "a, b", "This example is {}.", "Please type a text"),
     ("Some text", " , ,", "This example is {}.", "at least one label"),
     ("Some text", ",".join(f"label{i}" for i in range(300)), "This example is {}.", "300 labels is too many"),
     ("Some text", "a, b", "No placeholder here.", "exactly one {}"),
     ("Some text", "a, b", "Broken {0} {}", "no other braces")],
)
def test_classify_api_refuses_bad_requests_clearly(client, text, labels, template, expected):
    with pytest.raises(AppError, match=re.escape(expected)):
        client.predict(text, labels, template, api_name="/classify")


def test_classify_api_truncates_long_text_and_merges_duplicate_labels(client):
    result = client.predict("word " * 10_000, "news, sports, News, sports", api_name="/classify")
    assert result["truncated"] is True and sorted(result["labels"]) == ["news", "sports"]


ASSETS = Path(__file__).resolve().parent.parent / "assets"


def vision_model(demo_registry) -> str:
    return next(name for name, spec in demo_registry.items() if spec.task == "vision")


def test_image_api_streams_answers_and_follow_ups_see_the_image(client, demo_registry):
    name = vision_model(demo_registry)
    updates = list(client.submit(handle_file(str(ASSETS / "shapes.png")), "What is shown here?", name, "", 16, 0.0,
                                 api_name="/image"))
    assert len(updates) > 3 and "tokens" in stats(updates[-1])  # streamed, then the statistics
    follow_up = client.predict(None, "And its colours?", name, "", 12, 0.0, api_name="/image")
    without_image = Client(client.src, verbose=False).predict(None, "And its colours?", name, "", 12, 0.0, api_name="/image")
    assert answer(follow_up) != answer(without_image)  # the follow-up's prompt holds the image


def test_image_api_refuses_bad_files_readably(client, demo_registry, tmp_path):
    name = vision_model(demo_registry)
    fake = tmp_path / "photo.png"
    fake.write_text("this is not an image")
    with pytest.raises(AppError, match="image") as refused:
        client.predict(handle_file(str(fake)), "What is it?", name, api_name="/image")
    assert "Error" not in str(refused.value) and "Traceback" not in str(refused.value)
    strip = tmp_path / "strip.png"
    Image.new("RGB", (10000, 3)).save(strip)
    with pytest.raises(AppError, match="aspect|ratio|narrow|wide"):
        client.predict(handle_file(str(strip)), "What is it?", name, api_name="/image")
    assert stats(client.predict(handle_file(str(ASSETS / "chart.png")), "Still fine?", name, "", 4, 0.0, api_name="/image"))


def test_video_api_streams_an_answer_with_the_sampled_frames_counted(client, demo_registry, tmp_path):
    name = vision_model(demo_registry)
    updates = list(client.submit(handle_file(str(ASSETS / "clock.mp4")), "What happens?", name, "", 12, 0.0,
                                 1.0, 0, 1.0, -1, "", 2.0, 16, api_name="/video"))
    assert len(updates) > 3 and "tokens" in stats(updates[-1])
    fake = tmp_path / "movie.mp4"
    fake.write_text("not a video")
    with pytest.raises(AppError, match="not a readable video"):
        client.predict(handle_file(str(fake)), "What happens?", name, api_name="/video")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(AppError, match="empty"):
        client.predict(handle_file(str(empty)), "What happens?", name, api_name="/video")


@pytest.mark.parametrize("kind", ["huge", "cmyk", "palette-alpha", "animated-gif", "tiny"])
def test_image_api_answers_awkward_images_or_says_why_not(client, demo_registry, tmp_path, kind):
    path = tmp_path / ("image.gif" if kind == "animated-gif" else "image.jpg" if kind == "cmyk" else "image.png")
    if kind == "huge":
        Image.new("RGB", (8000, 8000), (90, 120, 200)).save(path, compress_level=1)
    elif kind == "cmyk":
        Image.new("CMYK", (300, 200), (0, 120, 200, 10)).save(path)
    elif kind == "palette-alpha":
        image = Image.new("P", (120, 80), 3)
        image.info["transparency"] = 3
        image.save(path)
    elif kind == "animated-gif":
        frames = [Image.new("RGB", (64, 64), color) for color in ((255, 0, 0), (0, 255, 0))]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    else:
        Image.new("RGB", (1, 1)).save(path)
    try:
        assert stats(client.predict(handle_file(str(path)), "Describe it.", vision_model(demo_registry), "", 4, 0.0,
                                    api_name="/image"))
    except AppError as refused:  # the 8000x8000 image downsized to the pixel limit still outgrows the demo's context
        assert kind == "huge" and "context" in str(refused)


def test_a_growing_conversation_past_the_context_keeps_working_with_a_notice(client, demo_names):
    notes = []
    for turn in range(10):
        final = client.predict(f"Turn {turn}: " + "tell me about the sea and the moon. " * 60, demo_names[0], "Be brief.", 8,
                               0.0, api_name="/chat")
        notes.append(stats(final))
    assert any("oldest messages left out to fit the context" in note for note in notes)
    assert "left out" not in notes[0]


def test_one_client_session_runs_at_most_its_limit_of_requests_at_once(client, demo_names):
    jobs = [client.submit(f"question {i}", demo_names[0], "", 400, 0.0, api_name="/chat") for i in range(4)]
    outcomes = []
    for job in jobs:
        try:
            outcomes.append(stats(job.result()))
        except AppError as refused:
            outcomes.append(str(refused))
    refused = [o for o in outcomes if "You already have 2 requests running" in o]
    assert 1 <= len(refused) <= 2 and len(outcomes) - len(refused) >= 2


@pytest.mark.parametrize(("system_prompt", "stops", "expected"), [
    ("x" * 30_000, "", "system prompt has 30,000 characters"),
    ("", "\n".join(f"stop{i}" for i in range(20)), "at most 16 stop sequences"),
    ("", "s" * 500, "at most 200 characters"),
])
def test_system_prompt_and_stop_sequences_are_capped(client, demo_names, system_prompt, stops, expected):
    with pytest.raises(AppError, match=expected):
        client.predict("hi", demo_names[0], system_prompt, 8, 0.0, 1.0, 0, 1.0, -1, stops, api_name="/chat")


@pytest.mark.parametrize(("fps", "max_frames", "expected"), [(1000, 16, "1000 is greater than maximum value 4"),
                                                             (0, 16, "0 is less than minimum value 0.25"),
                                                             (2.0, 100_000, "100000 is greater than maximum value 180")])
def test_video_frame_sampling_is_capped(client, demo_registry, fps, max_frames, expected):
    with pytest.raises(AppError, match=expected):
        client.predict(handle_file(str(ASSETS / "clock.mp4")), "What happens?", vision_model(demo_registry), "", 4, 0.0,
                       1.0, 0, 1.0, -1, "", fps, max_frames, api_name="/video")


UPLOAD_LIMIT = 2**20  # what `--max-upload-mb 1` sets


@pytest.fixture(scope="module")
def limited_server(server, demo_names):
    """The app with a 1 MB upload limit, launched as app.py launches it, over the same models."""
    _, manager = server
    app = build_app(manager, demo_names[0], limits=Limits(max_upload_bytes=UPLOAD_LIMIT)).queue()
    app.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
               max_file_size=UPLOAD_LIMIT)
    yield app
    app.close()


@pytest.mark.parametrize(("api", "name"), [("/image", "poster.png"), ("/video", "film.mp4")])
def test_files_over_the_upload_limit_are_refused_readably(limited_server, demo_registry, tmp_path, monkeypatch, api, name):
    client = Client(limited_server.local_url, verbose=False)
    big = tmp_path / name
    big.write_bytes(os.urandom(2 * UPLOAD_LIMIT))
    with pytest.raises(ValueError, match=f"exceeds the maximum file size of {UPLOAD_LIMIT} bytes"):
        client.predict(handle_file(str(big)), "What is it?", vision_model(demo_registry), api_name=api)  # gradio_client's own check
    with big.open("rb") as file:
        upload = httpx.post(client.upload_url, files=[("files", (name, file))])
    assert upload.status_code == 413 and "maximum allowed size" in upload.text  # Gradio's, for any HTTP client

    async def download(url: str, cache_dir: str) -> str:  # Gradio fetches a file given as a URL, without a limit
        target = Path(cache_dir) / "downloaded" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(big, target)
        return str(target)

    monkeypatch.setattr(processing_utils, "async_ssrf_protected_download", download)
    with pytest.raises(AppError, match=f"'{name}' is 2.0 MB; files are limited to 1 MB.") as refused:
        client.predict(handle_file(f"https://example.com/{name}"), "What is it?", vision_model(demo_registry), api_name=api)
    assert "Traceback" not in str(refused.value)


def test_files_under_the_upload_limit_are_answered(limited_server, demo_registry):
    client = Client(limited_server.local_url, verbose=False)
    assert stats(client.predict(handle_file(str(ASSETS / "shapes.png")), "What is it?", vision_model(demo_registry), "", 4, 0.0,
                                api_name="/image"))


@pytest.mark.parametrize(("api", "wrong"), [("/image", "clock.mp4"), ("/image", "notes.txt"),
                                            ("/video", "shapes.png"), ("/video", "notes.txt")])
def test_media_endpoints_take_only_their_kind_of_file(client, demo_registry, tmp_path, api, wrong):
    path = ASSETS / wrong if wrong != "notes.txt" else tmp_path / wrong
    if wrong == "notes.txt":
        path.write_text("plain text")
    with pytest.raises(AppError, match="Invalid file type"):
        client.predict(handle_file(str(path)), "What is it?", vision_model(demo_registry), api_name=api)


@pytest.mark.parametrize("api", ["image", "video"])
@pytest.mark.parametrize("path", ["/etc/passwd", str(ASSETS / "shapes.png")])
def test_media_endpoints_open_no_file_named_by_a_client(server, demo_registry, api, path):
    """A file on the server named in the request, rather than uploaded, is refused before the
    endpoint runs (Gradio accepts only its own upload folder's files)."""
    app, _ = server
    file = {"path": path, "meta": {"_type": "gradio.FileData"}}
    # every input as Gradio's HTTP API takes them, the session state's included
    data = [file, "What is in it?", None, vision_model(demo_registry), "", 4, 0.0, 1.0, 0, 1.0, -1, ""]
    data += [2.0, 16] if api == "video" else []
    event = httpx.post(f"{app.local_url}gradio_api/call/{api}", json={"data": data}).json()["event_id"]
    events = httpx.get(f"{app.local_url}gradio_api/call/{api}/{event}", timeout=60).text
    assert "event: error" in events and "event: complete" not in events
