"""The chat template shipped with exported models (HF ``tokenizer_config`` and GGUF metadata).

transformers, llama.cpp and vLLM render conversations from a Jinja string, so the exported
model carries one that reproduces :func:`codefoundry.tokenizer.chat.render_chat` token for
token (a test checks this on conversations with system prompts, tool calls and tool
outputs): EOT first, system/user messages in their tokens, and one assistant turn —
``<|assistant_start|>`` ... ``<|assistant_end|>`` — around every run of assistant messages,
tool calls and tool outputs between two user messages. It is assembled from the token
strings in :mod:`codefoundry.tokenizer.special`, so renaming a token changes it here too.
"""

from __future__ import annotations

from codefoundry.tokenizer import special as sp

# Message content: a string, or OpenAI content parts [{"type": "text", "text": ...}].
_CONTENT = ("{%- if message.content is string -%}{{ message.content }}"
            "{%- elif message.content -%}{%- for part in message.content -%}{{ part.text }}{%- endfor -%}"
            "{%- endif -%}")

# A tool call as render_chat writes it: {"name": ..., "arguments": {...}} (arguments given as a
# JSON string are copied verbatim).
_TOOL_CALLS = (
    "{%- for call in message.tool_calls or [] -%}"
    "{%- set fn = call.function if call.function is defined else call -%}"
    f"{sp.TOOL_CALL_START}"
    '{"name": {{ fn.name | tojson }}, "arguments": '
    "{%- if fn.arguments is string %} {{ fn.arguments }}{% else %} {{ (fn.arguments or {}) | tojson }}{% endif %}}"
    f"{sp.TOOL_CALL_END}"
    "{%- endfor -%}"
)

CHAT_TEMPLATE = (
    f"{sp.EOT}"
    "{%- set ns = namespace(in_turn=false) -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' or message.role == 'user' -%}"
    f"{{%- if ns.in_turn -%}}{sp.ASSISTANT_END}{{%- set ns.in_turn = false -%}}{{%- endif -%}}"
    f"{{%- if message.role == 'system' -%}}{sp.SYSTEM_START}{_CONTENT}{sp.SYSTEM_END}"
    f"{{%- else -%}}{sp.USER_START}{_CONTENT}{sp.USER_END}{{%- endif -%}}"
    "{%- elif message.role == 'assistant' -%}"
    f"{{%- if not ns.in_turn -%}}{sp.ASSISTANT_START}{{%- set ns.in_turn = true -%}}{{%- endif -%}}"
    f"{_CONTENT}{_TOOL_CALLS}"
    "{%- elif message.role == 'tool' -%}"
    f"{sp.TOOL_OUTPUT_START}{_CONTENT}{sp.TOOL_OUTPUT_END}"
    "{%- else -%}{{ raise_exception('unknown chat role: ' ~ message.role) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if not messages or messages[-1].role != 'tool' -%}"
    f"{{%- if ns.in_turn -%}}{sp.ASSISTANT_END}{{%- endif -%}}{sp.ASSISTANT_START}"
    "{%- endif -%}"
    f"{{%- elif ns.in_turn -%}}{sp.ASSISTANT_END}"
    "{%- endif -%}"
)
