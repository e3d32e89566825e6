"""A Jinja chat template that renders what the training template renders (`vir.data.templates`), for
`processor.apply_chat_template` on an exported model.

Content is a string (with `<image>` tags where images go) or a list of parts: `{"type": "image"}` becomes
`<image>\\n`, `{"type": "text", "text": ...}` its text, in order, as LLaVA places an image before its question.
"""

from __future__ import annotations

from typing import Optional

from vir.data.templates import BEGIN_OF_TEXT, END_HEADER, EOT, START_HEADER

# Message content -> one string in `ns.text` (parts joined in order).
_CONTENT = (
    "{%- set ns = namespace(text='') -%}"
    "{%- if message['content'] is string -%}{%- set ns.text = message['content'] -%}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set ns.text = ns.text + '<image>\\n' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
)


def llama3_chat_template(system_prompt: Optional[str] = None, image_token: str = "<image>") -> str:
    """Llama-3 instruct with LLaVA's image tags; `system_prompt` is used when the conversation has none (as
    `data.system_prompt` is in training)."""
    content = _CONTENT.replace("<image>", image_token)
    system = ""
    if system_prompt:
        quoted = system_prompt.replace("\\", "\\\\").replace("'", "\\'")
        system = (f"{{%- if messages[0]['role'] != 'system' -%}}{{{{ '{START_HEADER}system{END_HEADER}\\n\\n' + "
                  f"'{quoted}' | trim + '{EOT}' }}}}{{%- endif -%}}")
    return (
        f"{{{{- '{BEGIN_OF_TEXT}' -}}}}" + system +
        "{%- for message in messages -%}" + content +
        f"{{{{- '{START_HEADER}' + message['role'] + '{END_HEADER}\\n\\n' + ns.text | trim + '{EOT}' -}}}}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{- '{START_HEADER}assistant{END_HEADER}\\n\\n' -}}}}{{%- endif -%}}"
    )


def plain_chat_template(image_token: str = "<image>") -> str:
    """LLaVA's stage-1 `plain` format: bos, then the first user turn's images; the text is not shown to the
    model (a stage-1 model only captions)."""
    content = _CONTENT.replace("<image>", image_token)
    return (
        f"{{{{- '{BEGIN_OF_TEXT}' -}}}}"
        "{%- for message in messages if message['role'] == 'user' -%}{%- if loop.first -%}" + content +
        f"{{{{- '{image_token}' * (ns.text.count('{image_token}')) -}}}}"
        "{%- endif -%}{%- endfor -%}"
    )
