"""ZeroGPU: the request handlers that run model work wear `spaces.GPU` when `spaces` is importable
(here a stand-in module in sys.modules) and are untouched without it."""
from __future__ import annotations

import functools
import importlib
import inspect
import sys
import types

import pytest

from ernie_app import zerogpu
from ernie_app.manager import ModelManager
from ernie_app.ui import build_app

MODEL_HANDLERS = {"respond", "chat", "image", "video", "run", "classify"}


def stand_in_spaces(calls: list) -> types.ModuleType:
    """`spaces.GPU(duration=...)` as ZeroGPU's decorator is shaped: generator functions stay
    generators; every call is recorded with its duration."""
    def GPU(task=None, *, duration=None):
        def decorate(function):
            if inspect.isgeneratorfunction(function):
                @functools.wraps(function)
                def wrapper(*args, **kwargs):
                    calls.append((function.__name__, duration))
                    yield from function(*args, **kwargs)
            else:
                @functools.wraps(function)
                def wrapper(*args, **kwargs):
                    calls.append((function.__name__, duration))
                    return function(*args, **kwargs)
            wrapper.zerogpu = None
            return wrapper
        return decorate if task is None else decorate(task)

    module = types.ModuleType("spaces")
    module.GPU = GPU
    return module


@pytest.fixture()
def spaces_calls(monkeypatch):
    """`spaces` importable: the calls its GPU decorator saw."""
    calls = []
    monkeypatch.setitem(sys.modules, "spaces", stand_in_spaces(calls))
    importlib.reload(zerogpu)
    yield calls
    monkeypatch.undo()
    importlib.reload(zerogpu)


@pytest.fixture()
def no_spaces(monkeypatch):
    monkeypatch.setitem(sys.modules, "spaces", None)  # `import spaces` raises ImportError
    importlib.reload(zerogpu)
    yield
    monkeypatch.undo()
    importlib.reload(zerogpu)


def decorated_handlers(app) -> set[str]:
    return {block_fn.fn.__name__ for block_fn in app.fns.values() if hasattr(block_fn.fn, "zerogpu")}


def test_a_decorated_generator_streams_one_item_at_a_time(spaces_calls, monkeypatch):
    monkeypatch.setenv("ERNIE_STUDIO_ZEROGPU_DURATION", "45")
    produced = []

    def tokens(count):
        for i in range(count):
            produced.append(i)
            yield i

    stream = zerogpu.gpu(tokens)(3)
    assert next(stream) == 0 and produced == [0]  # not run to the end first
    assert list(stream) == [1, 2]
    assert spaces_calls == [("tokens", 45)]
    assert zerogpu.gpu(len)("abc") == 3 and spaces_calls[-1] == ("len", 45)


def test_without_spaces_functions_are_returned_unchanged(no_spaces):
    def respond():
        yield "x"

    assert zerogpu.gpu(respond) is respond and zerogpu.gpu(len) is len


def test_the_app_model_handlers_run_under_spaces_gpu(spaces_calls, demo_registry, demo_names):
    app = build_app(ModelManager(demo_registry), demo_names[0])
    assert decorated_handlers(app) == MODEL_HANDLERS
    chat = next(block_fn.fn for block_fn in app.fns.values() if block_fn.api_name == "chat")
    updates = list(chat("Hello", [], demo_names[0], "", 6, 0.0))
    assert len(updates) > 2 and updates[-1][0][-1]["metadata"]["title"].startswith("⚡")  # streamed, then the statistics
    assert spaces_calls == [("chat", 120)]


def test_without_spaces_the_app_handlers_are_plain(no_spaces, demo_registry, demo_names):
    app = build_app(ModelManager(demo_registry), demo_names[0])
    assert decorated_handlers(app) == set()
    assert not any(hasattr(block_fn.fn, "__wrapped__") for block_fn in app.fns.values() if block_fn.fn)
