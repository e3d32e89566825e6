"""Files an export writes so that the stacks users already run read them: transformers 4.x and 5.x, tokenizers
0.15 onwards (the pins of LLaVA's own package), not only the versions this project trains with.

- `tokenizer_config.json` names `PreTrainedTokenizerFast`, a class both major versions of transformers have
  (transformers 5 writes `TokenizersBackend`, unknown to 4.x), and lists added special tokens as
  `additional_special_tokens` (5's `extra_special_tokens` list breaks 4.x).
- `tokenizer.json` writes BPE merges as `"a b"` strings, the form every tokenizers release reads (0.20 onwards
  write `["a", "b"]` pairs, which 0.15 cannot parse). A merge whose parts hold a space cannot be written that way
  and stays a pair.
- Metaspace pre-tokenizers and decoders (SentencePiece-style: Llama 2, Vicuna, Mistral, Gemma, Phi-3) also carry
  `add_prefix_space`, which tokenizers 0.15 requires; `split` stays for newer releases. 0.15 ignores `split` and
  always splits at spaces, so under it a run of several spaces may tokenize differently.
- The chat template inside `tokenizer_config.json` too: transformers 5 writes it only to `chat_template.jinja`,
  which 4.x before 4.50 never reads (it then renders its own default, ChatML, silently).
- `rope_theta` (and `rope_scaling`) beside transformers 5's `rope_parameters`: transformers 4.x reads only those,
  and without them runs RoPE at base 10000 whatever the model was trained with.
- Vision-tower weights under `vision_model.` (`model.vision_tower.vision_model.*`), where transformers 4.x's
  CLIP/SigLIP vision models keep them; transformers 5 writes them without it but reads both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from safetensors import safe_open
from safetensors.torch import load_file, save_file

PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
_BACKEND_CLASSES = ("TokenizersBackend",)


def write_portable_tokenizer(directory: Path) -> None:
    """Rewrite a saved tokenizer's files in `directory` in their portable form (see module doc), in place."""
    config_file = Path(directory) / "tokenizer_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        if config.get("tokenizer_class") in _BACKEND_CLASSES:
            config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
        extra = config.get("extra_special_tokens")
        if isinstance(extra, list):  # transformers 5's list; 4.x reads the same tokens as additional_special_tokens
            config.pop("extra_special_tokens")
            config["additional_special_tokens"] = list(dict.fromkeys([*config.get("additional_special_tokens", []),
                                                                      *extra]))
        template_file = Path(directory) / "chat_template.jinja"
        if template_file.is_file() and not config.get("chat_template"):
            config["chat_template"] = template_file.read_text()
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    tokenizer_file = Path(directory) / "tokenizer.json"
    if tokenizer_file.is_file():
        data = json.loads(tokenizer_file.read_text())
        model = data.get("model") or {}
        merges = model.get("merges")
        if isinstance(merges, list) and merges and isinstance(merges[0], list):
            if not any(" " in part for merge in merges for part in merge):
                model["merges"] = [" ".join(merge) for merge in merges]
        for component in (data.get("pre_tokenizer"), data.get("decoder")):
            _legacy_metaspace(component)
        tokenizer_file.write_text(json.dumps(data, ensure_ascii=False))


def _legacy_metaspace(component: Any) -> None:
    """Give every Metaspace in a pre-tokenizer or decoder (nested in Sequences too) the `add_prefix_space` field
    tokenizers 0.15 requires, in place (see module doc)."""
    if not isinstance(component, dict):
        return
    if component.get("type") == "Metaspace" and "add_prefix_space" not in component:
        component["add_prefix_space"] = component.get("prepend_scheme", "always") != "never"
    for key in ("pretokenizers", "decoders"):
        for part in component.get(key) or []:
            _legacy_metaspace(part)


def legacy_rope_fields(config: Dict[str, Any]) -> Dict[str, Any]:
    """`rope_theta` / `rope_scaling` for a text config dict holding transformers 5's `rope_parameters` (empty when
    it holds none): what transformers 4.x reads instead."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        return {}
    rope_type = rope.get("rope_type", "default")
    scaling = None if rope_type == "default" else {**{k: v for k, v in rope.items() if k != "rope_theta"},
                                                   "type": rope_type}
    return {"rope_theta": rope["rope_theta"], "rope_scaling": scaling}


def add_legacy_rope_fields(config_file: Path, text_key: str | None = None) -> None:
    """Add `legacy_rope_fields` to a saved config.json (to its `text_key` part, e.g. `text_config`), in place."""
    config = json.loads(Path(config_file).read_text())
    target = config.get(text_key) if text_key else config
    if isinstance(target, dict):
        target.update({k: v for k, v in legacy_rope_fields(target).items() if k not in target})
        Path(config_file).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def nest_tower_keys(directory: Path, tower_prefixes: tuple = ("vision_tower.", "model.vision_tower.")) -> None:
    """Rename `{prefix}X` to `{prefix}vision_model.X` for each tower prefix (transformers 5 saves a Llava's tower
    as `vision_tower.*`) in every weight file of `directory` and in its shard index, in place (see module doc).
    Tensors are unchanged; file metadata is kept."""

    def nested(key: str) -> str:
        for prefix in tower_prefixes:
            if key.startswith(prefix) and not key.startswith(prefix + "vision_model."):
                return prefix + "vision_model." + key[len(prefix):]
        return key

    for path in sorted(Path(directory).glob("model*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(str(path))
        save_file({nested(k): v for k, v in tensors.items()}, str(path), metadata=metadata)
    index_file = Path(directory) / "model.safetensors.index.json"
    if index_file.is_file():
        index = json.loads(index_file.read_text())
        index["weight_map"] = {nested(k): v for k, v in index["weight_map"].items()}
        index_file.write_text(json.dumps(index, indent=2) + "\n")
