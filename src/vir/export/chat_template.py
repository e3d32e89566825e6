"""A Jinja chat template that renders what the training template renders (`vir.data.templates`), for
`processor.apply_chat_template` on an exported model: `chat_template_for(data.template, tokenizer,
data.system_prompt, model.image_token)`.

Content is a string (with `<image>` tags where images go) or a list of parts: `{"type": "image"}` becomes
`<image>\\n`, `{"type": "text", "text": ...}` its text, in order, as LLaVA places an image before its question.
"""

from __future__ import annotations

from typing import Optional

from vir.data.conversation import Message
from vir.data.templates import BEGIN_OF_TEXT, END_HEADER, EOT, START_HEADER, build_generation_prompt, check_template
from vir.data.templates_auto import reads_typed_parts
from vir.data.templates_text import QWEN2_5_SYSTEM, VICUNA_V1_SYSTEM

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


def plain_chat_template(image_token: str = "<image>", bos_token: Optional[str] = BEGIN_OF_TEXT) -> str:
    """LLaVA's stage-1 `plain` format: bos (none when `bos_token` is None), then the first user turn's images;
    the text is not shown to the model (a stage-1 model only captions)."""
    content = _CONTENT.replace("<image>", image_token)
    return (
        (f"{{{{- '{_quote(bos_token)}' -}}}}" if bos_token else "") +
        "{%- for message in messages if message['role'] == 'user' -%}{%- if loop.first -%}" + content +
        f"{{{{- '{image_token}' * (ns.text.count('{image_token}')) -}}}}"
        "{%- endif -%}{%- endfor -%}"
    )


def _quote(text: str) -> str:
    """`text` inside a single-quoted Jinja string literal."""
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _system_text(default: str) -> str:
    """Sets `sys.text`: the conversation's system turn (as text), else `default` (already chosen from
    `data.system_prompt` and the template's own default)."""
    return ("{%- set sys = namespace(text='" + _quote(default) + "') -%}"
            "{%- if messages and messages[0]['role'] == 'system' -%}{%- set message = messages[0] -%}" + _CONTENT +
            "{%- set sys.text = ns.text -%}{%- endif -%}")


_TURNS = "{%- for message in messages if message['role'] != 'system' -%}"


def vicuna_v1_chat_template(system_prompt: Optional[str] = None, image_token: str = "<image>") -> str:
    """`vicuna_v1` (LLaVA-1.5's `conv_vicuna_v1`): `{system} USER: {q} ASSISTANT: {a}</s>...ASSISTANT:`. No bos
    in the text: the processor adds it when tokenizing (the text does not start with it), so the text after it
    tokenizes as in training."""
    content = _CONTENT.replace("<image>", image_token)
    return (_system_text(system_prompt or VICUNA_V1_SYSTEM) + "{%- if sys.text -%}{{- sys.text + ' ' -}}"
            "{%- endif -%}" + _TURNS + content +
            "{%- if message['role'] == 'user' -%}{{- 'USER: ' + ns.text + ' ' -}}"
            "{%- else -%}{{- 'ASSISTANT: ' + ns.text + '</s>' -}}{%- endif -%}{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}")


def mistral_instruct_chat_template(system_prompt: Optional[str] = None, image_token: str = "<image>") -> str:
    """`mistral_instruct` (Mistral-7B-Instruct-v0.2): `<s> [INST] {q} [/INST] {a}</s> [INST] {q2} [/INST]`."""
    content = _CONTENT.replace("<image>", image_token)
    return (_system_text(system_prompt or "") + "{{- '<s>' -}}" + _TURNS + content +
            "{%- if message['role'] == 'user' -%}{%- if loop.first and sys.text -%}"
            "{{- ' [INST] ' + sys.text + '\\n\\n' + ns.text + ' [/INST]' -}}"
            "{%- else -%}{{- ' [INST] ' + ns.text + ' [/INST]' -}}{%- endif -%}"
            "{%- else -%}{{- ' ' + ns.text + '</s>' -}}{%- endif -%}{%- endfor -%}")


def chatml_chat_template(system_prompt: Optional[str] = None, image_token: str = "<image>") -> str:
    """`chatml` (Qwen2.5): a system turn first (Qwen2.5's default when none), `<|im_start|>{role}\\n...`."""
    content = _CONTENT.replace("<image>", image_token)
    return (_system_text(system_prompt or QWEN2_5_SYSTEM) +
            "{{- '<|im_start|>system\\n' + sys.text + '<|im_end|>\\n' -}}" + _TURNS + content +
            "{{- '<|im_start|>' + message['role'] + '\\n' + ns.text + '<|im_end|>\\n' -}}{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")


def gemma_chat_template(system_prompt: Optional[str] = None, image_token: str = "<image>") -> str:
    """`gemma` (Gemma 2): `<bos><start_of_turn>user\\n...<end_of_turn>\\n`, a system text before the first
    user turn's text."""
    content = _CONTENT.replace("<image>", image_token)
    return (_system_text(system_prompt or "") + "{{- '<bos>' -}}" + _TURNS + content +
            "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
            "{%- set text = ns.text | trim -%}"
            "{%- if loop.first and sys.text -%}{%- set text = sys.text + '\\n\\n' + text -%}{%- endif -%}"
            "{{- '<start_of_turn>' + role + '\\n' + text + '<end_of_turn>\\n' -}}{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}")


def auto_chat_template(tokenizer, system_prompt: Optional[str] = None, image_token: str = "<image>") -> str:
    """The tokenizer's own template, given string content as training gave it: list content is joined first
    (`<image>\\n` per image part), and `system_prompt` is put first when the conversation has no system turn. A
    template that reads typed parts itself (llava-hf's) is returned as it is, with the system turn added."""
    own = tokenizer.chat_template
    system = ("{%- if messages and messages[0]['role'] != 'system' -%}{%- set messages = [{'role': 'system', "
              "'content': '" + _quote(system_prompt) + "'}] + messages -%}{%- endif -%}") if system_prompt else ""
    if reads_typed_parts(own):
        if system_prompt:
            system = system.replace("'content': '" + _quote(system_prompt) + "'",
                                    "'content': [{'type': 'text', 'text': '" + _quote(system_prompt) + "'}]")
        return system + own
    content = _CONTENT.replace("<image>", image_token)
    joined = ("{%- set joined = namespace(messages=[]) -%}{%- for message in messages -%}" + content +
              "{%- set joined.messages = joined.messages + [{'role': message['role'], 'content': ns.text}] -%}"
              "{%- endfor -%}{%- set messages = joined.messages -%}")
    return joined + system + own


def chat_template_for(template_name: str, tokenizer, system_prompt: Optional[str] = None,
                      image_token: str = "<image>") -> str:
    """The Jinja chat template an export of a model trained with `data.template=template_name` ships: it renders
    what `build_generation_prompt` builds (one image token per tag; the processor expands it). Raises
    `TemplateError` when the template cannot render with `tokenizer` (`check_template`)."""
    check_template(template_name, tokenizer)
    if template_name == "plain":
        return plain_chat_template(image_token, tokenizer.bos_token)
    if template_name == "auto":
        return auto_chat_template(tokenizer, system_prompt, image_token)
    builders = {"llama3": llama3_chat_template, "vicuna_v1": vicuna_v1_chat_template,
                "mistral_instruct": mistral_instruct_chat_template, "chatml": chatml_chat_template,
                "gemma": gemma_chat_template}
    return builders[template_name](system_prompt, image_token)



def drop_implicit_bos(tokenizer, template: str, image_token_id: int, num_image_tokens: int,
                      chat_template: Optional[str] = None) -> None:
    """Make the tokenizer add a bos only where the chat template relies on it, in place, so every usual way of
    prompting the export gives training's ids: `apply_chat_template(tokenize=True)` (transformers' processor adds
    the tokenizer's special tokens unless the rendered text starts with bos), and rendering first, then
    `processor(text=...)` (special tokens added), as transformers' Llava examples, lmms-eval and vLLM do.

    It keeps adding one only when training's prompts start with bos and the exported `chat_template` does not write
    it (`vicuna_v1`); it stops when the template writes bos itself (`llama3`: no second one) or when training's
    prompts have none (Phi-3's and llava-hf's own templates)."""
    if tokenizer.bos_token is None or tokenizer("a")["input_ids"][:1] != [tokenizer.bos_token_id]:
        return
    prompt = build_generation_prompt([Message("user", "a")], tokenizer, template, image_token_id, num_image_tokens)
    writes_bos = chat_template is not None and tokenizer.apply_chat_template(
        [{"role": "user", "content": "a"}], chat_template=chat_template, tokenize=False,
        add_generation_prompt=True).startswith(tokenizer.bos_token)
    if prompt[:1] != [tokenizer.bos_token_id] or writes_bos:
        tokenizer.add_bos_token = False
