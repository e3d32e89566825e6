"""One chat model from what a user points `vir-demo` at: a vir run directory (or its `checkpoint-N/`), a
`vir-merge` checkpoint (both through `load_run`), or a `vir-export` directory (transformers'
`LlavaForConditionalGeneration` with its processor and chat template).

Each kind turns `(messages, images)` into the `generate` inputs its own way; `encode` is the one place that
differs. The vir kind builds prompts exactly as `vir.inference.generate.generate_answers` does, so a greedy
answer here is `vir-eval`'s answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional, Sequence

import torch
from PIL import Image

from vir.data.conversation import DEFAULT_IMAGE_TOKEN, Message
from vir.data.images import preprocess_images, processor_image_size
from vir.data.templates import build_generation_prompt, generation_stop_ids
from vir.data.templates_text import TemplateError
from vir.inference.generate import generation_pad_id
from vir.models.builder import DTYPES
from vir.models.checkpoint import RUN_CONFIG_FILE
from vir.utils.errors import UserError



class ModelDirError(UserError):
    """The path given to vir-demo is not something it can load; the message names the path."""


@dataclass
class ChatModel:
    """A loaded model and how to prompt it. `kind` is `vir` or `hf`; `context_length` is the most tokens a
    prompt plus its answer may hold; `run_config` is the run's resolved config (None for an export)."""

    kind: str
    path: Path
    model: Any
    tokenizer: Any
    image_processor: Any = None
    processor: Any = None
    run_config: Any = None
    context_length: int = 2048
    image_token: str = DEFAULT_IMAGE_TOKEN
    num_image_tokens: int = 1
    notes: list = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def image_side(self) -> Optional[int]:
        """The model's image input side (large uploads are reduced to about twice it), None without images."""
        return min(processor_image_size(self.image_processor)) if self.image_processor is not None else None

    @property
    def pad_id(self) -> int:
        return generation_pad_id(self.tokenizer)

    @property
    def stop_ids(self) -> list[int]:
        """What generation stops at: the chat template's end-of-turn token (the run's `data.template`; for an
        export, the one its own chat template writes), the tokenizer's eos and the model's generation_config
        eos ids (`generation_stop_ids`)."""
        generation_config = getattr(self.model, "generation_config", None)
        if self.kind == "vir":
            return generation_stop_ids(self.run_config.data.template, self.tokenizer, generation_config)
        try:
            return generation_stop_ids("auto", self.tokenizer, generation_config)
        except TemplateError:  # no chat template to read an end-of-turn token from: eos ids only
            return generation_stop_ids("plain", self.tokenizer, generation_config)

    def encode(self, messages: Sequence[Message], images: Sequence[Image.Image]) -> dict:
        """`generate` inputs (`input_ids [1, T]`, `attention_mask`, `pixel_values` when there are images) for a
        conversation that ends with a user turn whose image tags are in `messages`, images in tag order."""
        if self.kind == "hf":
            return self._encode_hf(messages, images)
        data = self.run_config.data
        config = self.model.config
        ids = build_generation_prompt(messages, self.tokenizer, data.template, getattr(config, "image_token_id", None),
                                      self.num_image_tokens, data.system_prompt, self.image_token)
        inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        if images:
            inputs["pixel_values"] = preprocess_images(list(images), self.image_processor, data.image_aspect_ratio)
        return {k: v.to(self.device) for k, v in inputs.items()}

    def _encode_hf(self, messages: Sequence[Message], images: Sequence[Image.Image]) -> dict:
        pending = list(images)
        chat = []
        for message in messages:
            parts = []
            pieces = message.content.split(self.image_token)
            for k, piece in enumerate(pieces):
                if k:
                    parts.append({"type": "image", "image": pending.pop(0)})
                if piece.strip():
                    parts.append({"type": "text", "text": piece.lstrip("\n")})
            chat.append({"role": message.role, "content": parts})
        inputs = self.processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True, return_tensors="pt")
        out = {}
        for key, value in inputs.items():
            if key == "pixel_values":
                value = value.to(self.dtype)
            out[key] = value.to(self.device)
        return out


def model_kind(path: Path) -> str:
    """`vir` (a run, a checkpoint-N/ or a vir-merge output), `hf` (a vir-export directory), or ModelDirError."""
    if not path.exists():
        raise ModelDirError(f"{path}: no such directory")
    if not path.is_dir():
        raise ModelDirError(f"{path}: not a directory (give a run directory, a vir-merge or a vir-export output)")
    if (path / RUN_CONFIG_FILE).is_file():
        return "vir"
    config = path / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except ValueError as err:
            raise ModelDirError(f"{config}: not valid JSON ({err})") from None
        if model_type == "llava":
            return "hf"
    raise ModelDirError(f"{path}: neither a vir run directory ({RUN_CONFIG_FILE} is missing) nor a vir-export "
                        "directory (a config.json of model_type llava)")


def load_chat_model(path, device: Optional[str] = None, dtype: str = "float32",
                    load_in_4bit: bool = False) -> ChatModel:
    """Load `path` for chatting on `device` (default: the GPU when there is one, else the CPU) in `dtype` (a word
    of `model.llm.dtype`: float32, bfloat16, float16); `load_in_4bit` loads the LLM's weights in nf4 with
    bitsandbytes (a run, a merge or an export; the tower and the projector stay in full precision)."""
    path = Path(path)
    kind = model_kind(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelDirError("--device cuda: no CUDA device is available here (use --device cpu)")
    if dtype not in DTYPES:
        raise ModelDirError(f"unknown dtype {dtype!r}; choices: {sorted(DTYPES)}")
    if kind == "hf":
        return _load_export(path, device, DTYPES[dtype], load_in_4bit)
    return _load_vir(path, device, DTYPES[dtype], load_in_4bit)


def _load_vir(path: Path, device: str, dtype: torch.dtype, load_in_4bit: bool) -> ChatModel:
    from vir.models.checkpoint import load_run
    from vir.models.quantization import is_quantized

    model, tokenizer, image_processor, run_config = load_run(path, device=device,
                                                             quantize="nf4" if load_in_4bit else None)
    if dtype != torch.float32 and not is_quantized(model):
        model = model.to(dtype)
    config = model.config
    return ChatModel("vir", path, model, tokenizer, image_processor=image_processor, run_config=run_config,
                     context_length=int(run_config.model.model_max_length),
                     image_token=getattr(config, "image_token", None) or run_config.model.image_token,
                     num_image_tokens=getattr(config, "num_image_tokens", None) or 1)


def _load_export(path: Path, device: str, dtype: torch.dtype, load_in_4bit: bool) -> ChatModel:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    kwargs: dict = {"dtype": dtype}
    if load_in_4bit:
        from vir.models.quantization import NOT_QUANTIZED_HF_LLAVA, quantization_config

        nf4 = SimpleNamespace(quantization="nf4", double_quant=False)
        kwargs.update(quantization_config=quantization_config(nf4, dtype, NOT_QUANTIZED_HF_LLAVA), device_map=device)
    model = LlavaForConditionalGeneration.from_pretrained(str(path), **kwargs)
    if not load_in_4bit:
        model.to(device)
    model.eval()
    processor = AutoProcessor.from_pretrained(str(path))
    tokenizer = processor.tokenizer
    limit = tokenizer.model_max_length if tokenizer.model_max_length and tokenizer.model_max_length < 10**7 else None
    context = limit or getattr(model.config.get_text_config(), "max_position_embeddings", 2048)
    image_token = getattr(processor, "image_token", None) or DEFAULT_IMAGE_TOKEN
    return ChatModel("hf", path, model, tokenizer, image_processor=processor.image_processor, processor=processor,
                     context_length=int(context), image_token=image_token,
                     num_image_tokens=int(getattr(processor, "num_image_tokens", 0) or 1))
