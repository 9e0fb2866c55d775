"""Chat prompts rendered by us equal transformers' apply_chat_template on the same files."""
from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from models import load_tokenizer
from models.chat_template import ERNIE_4_5_CHAT_TEMPLATE
from models.factory import write_tokenizer_files

CONVERSATIONS = {
    "one_turn": [{"role": "user", "content": "Hey, are you conscious?"}],
    "system_multi_turn": [
        {"role": "system", "content": "You are ERNIE. 回答要简洁。"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你？😀"},
        {"role": "user", "content": "Tell me a joke\nabout cats."},
    ],
    "unknown_role_dropped": [{"role": "tool", "content": "ignored"}, {"role": "user", "content": "hi"}],
}

# A template in the style of the -Thinking checkpoints: loops, namespace, tojson and a check.
THINKING_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages -%}{%- if m.role == 'system' -%}{%- set ns.system = m.content -%}{%- endif -%}{%- endfor -%}"
    "{{ bos_token }}{{ ns.system }}\n"
    "{%- for m in messages if m.role != 'system' %}\n"
    "  {%- if m.role not in ['user', 'assistant'] %}{{ raise_exception('Unsupported role ' + m.role) }}{% endif %}\n"
    "  {{ m.role | capitalize }}: {{ m.content }}{{ '\\n' if m.role == 'user' else eos_token }}\n"
    "{%- endfor %}\n"
    "{%- if tools %}{{ tools | tojson }}{% endif %}"
    "{%- if add_generation_prompt %}Assistant: <think>\n{% endif %}"
)


@pytest.fixture()
def folder(tmp_path):
    write_tokenizer_files(tmp_path)
    return tmp_path


def set_template(folder, template):
    config = json.loads((folder / "tokenizer_config.json").read_text())
    if template is None:
        config.pop("chat_template", None)
    else:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def assert_same_prompts(folder, conversations=tuple(CONVERSATIONS.values()), **kwargs):
    ours, reference = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    for messages in conversations:
        for add_generation_prompt in (True, False):
            expected = reference.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
            )
            assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_checkpoint_template_matches_transformers(folder):
    assert_same_prompts(folder)
    prompt = load_tokenizer(folder).apply_chat_template(CONVERSATIONS["one_turn"])
    assert prompt == "<|begin_of_sentence|>User: Hey, are you conscious?\nAssistant: "


def test_custom_template_matches_transformers(folder):
    set_template(folder, THINKING_TEMPLATE)
    messages = CONVERSATIONS["system_multi_turn"]
    ours, reference = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    tools = [{"name": "search", "description": "搜索"}]
    assert ours.apply_chat_template(messages, tools=tools) == reference.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True
    )


def test_chat_template_jinja_file_wins(folder):
    """transformers v5 saves templates to chat_template.jinja; that file takes precedence."""
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder / "saved")
    (folder / "saved" / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    assert load_tokenizer(folder / "saved").chat_template == THINKING_TEMPLATE
    assert_same_prompts(folder / "saved", [CONVERSATIONS["one_turn"], CONVERSATIONS["system_multi_turn"]])


def test_fallback_is_the_documented_ernie_template(folder):
    set_template(folder, None)
    assert load_tokenizer(folder).chat_template == ERNIE_4_5_CHAT_TEMPLATE
    assert_same_prompts(folder, chat_template=ERNIE_4_5_CHAT_TEMPLATE)


def test_template_errors_are_value_errors(folder):
    with pytest.raises(ValueError, match="chat template error"):
        load_tokenizer(folder).apply_chat_template([{"role": "user"}])  # no content
    with pytest.raises(ValueError):
        load_tokenizer(folder).apply_chat_template("not a list")
    set_template(folder, THINKING_TEMPLATE)
    with pytest.raises(ValueError, match="Unsupported role tool"):
        load_tokenizer(folder).apply_chat_template([{"role": "tool", "content": "x"}])
    set_template(folder, "{% for %}")
    with pytest.raises(ValueError, match="chat template error"):
        load_tokenizer(folder).apply_chat_template(CONVERSATIONS["one_turn"])
