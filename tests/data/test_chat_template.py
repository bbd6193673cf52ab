"""Chat templates render as transformers renders them (its jinja environment's features)."""

from __future__ import annotations

from datetime import datetime

import pytest

from gptcli.data.tokenizers.chat_template import render_chat
from gptcli.errors import GptcliError

USER = [{"role": "user", "content": "hi <b> & 'q' 日本"}]


def test_blocks_leave_no_whitespace_and_the_generation_prompt_is_optional():
    template = ("{{ bos_token }}\n{% for m in messages %}\n    {% if m.role == 'user' %}\n"
                "[{{ m.role }}] {{ m.content }}\n    {% endif %}\n{% endfor %}\n"
                "{% if add_generation_prompt %}\n[assistant]\n{% endif %}\n")
    turn = "<s>\n[user] hi <b> & 'q' 日本\n"
    assert render_chat(template, USER, True, {"bos_token": "<s>"}) == turn + "[assistant]\n"
    assert render_chat(template, USER, False, {"bos_token": "<s>"}) == turn


def test_filters_globals_and_extensions():
    template = ("{{ messages[0] | tojson }}|{{ messages | tojson(indent=1) | length > 0 }}|"
                "{% for i in range(5) %}{% if i == 3 %}{% break %}{% endif %}{% if i == 1 %}{% continue %}"
                "{% endif %}{{ i }}{% endfor %}|{% generation %}kept{% endgeneration %}|"
                "{{ strftime_now('%Y') }}|{{ eos_token }}")
    text = render_chat(template, USER, False, {})
    assert text == f'{{"role": "user", "content": "hi <b> & \'q\' 日本"}}|True|02|kept|{datetime.now().year}|'


def test_raise_exception_is_a_one_line_error_with_the_templates_message():
    template = ("{% if messages[0].role != 'system' %}{{ raise_exception('System message\nfirst, please') }}"
                "{% endif %}")
    with pytest.raises(GptcliError, match="chat template refused the conversation: System message first, please"):
        render_chat(template, USER, True, {})


@pytest.mark.parametrize("template, message", [
    ("{% for m in messages %}{{ m.content }", "syntax error at line 1"),
    ("{{ messages[0].content + 1 }}", "chat template failed"),
    ("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", "chat template failed"),  # sandbox
])
def test_template_errors_are_one_line(template, message):
    with pytest.raises(GptcliError, match=message) as caught:
        render_chat(template, USER, True, {})
    assert "\n" not in str(caught.value)
