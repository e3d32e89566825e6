"""A run directory -> a transformers `LlavaForConditionalGeneration` directory (what vLLM and SGLang serve).

    export_hf_llava("runs/my_run", "exports/my_run")     # LoRA merged, safetensors, processor, model card

The weights are renamed, never changed (`hf_state_dict`): the LLM under `model.language_model.*` (its family's
`text_config`: Llama, Mistral, Qwen, Gemma, Phi, ...), the CLIP or SigLIP tower under `model.vision_tower.*`
(`vision_feature_select_strategy` `default` drops CLIP's CLS token, `full` keeps every SigLIP token), the
projector's two linear layers under `model.multi_modal_projector.linear_1/2`.

One difference transformers' Llava imposes: it computes `lm_head(h)` and never applies a family's
`final_logit_softcapping` (Gemma 2/3). Such an export's logits are the un-capped ones; since the cap is a monotone
`c * tanh(x / c)`, greedy answers and token rankings are unchanged.
The processor is transformers' own: a `LlavaImageProcessorPil` that pads to a square with the mean colour
(`do_pad`, LLaVA-1.5's `pad`) or centre-crops (`crop`), the run's tokenizer, and a chat template that renders
what training rendered (`vir.export.chat_template`).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Dict, Optional

import torch
from omegaconf import DictConfig
from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedConfig
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from vir.data.templates import generation_stop_ids
from vir.export.card import write_model_card
from vir.export.destination import check_destination, staged_export
from vir.export.portable import add_legacy_rope_fields, nest_tower_keys, write_portable_tokenizer
from vir.export.chat_template import chat_template_for, drop_implicit_bos
from vir.models.checkpoint import ADAPTER_CONFIG_FILE, load_run
from vir.models.configuration import has_cls_token
from vir.models.families import text_config_class
from vir.models.hf_import import HF_PROJECTOR_LAYERS
from vir.utils.errors import UserError
from vir.utils.paths import PathLike

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = "5GB"
_TOWER_PREFIX = "model.vision_tower.vision_tower."


class ExportError(UserError):
    """A run that this export format cannot express; the message says what and what to do."""


def hf_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Our LLaVA model's keys (any family whose base model sits under `model.`) -> `LlavaForConditionalGeneration`
    keys (same tensors; pure)."""
    out = {}
    for key, tensor in state_dict.items():
        if key.startswith(_TOWER_PREFIX):
            new = "model.vision_tower." + key[len(_TOWER_PREFIX):]
        elif key.startswith("model.mm_projector."):
            layer, _, param = key[len("model.mm_projector."):].partition(".")
            if layer not in HF_PROJECTOR_LAYERS:
                raise ExportError(f"projector layer {layer!r} has no place in LlavaMultiModalProjector")
            new = f"model.multi_modal_projector.{HF_PROJECTOR_LAYERS[layer]}.{param}"
        elif key.startswith("model."):
            new = "model.language_model." + key[len("model."):]
        elif key == "lm_head.weight":
            new = key
        else:
            raise ExportError(f"unexpected weight {key!r}: not part of a LLaVA model")
        out[new] = tensor
    return out


def feature_select_strategy(config: PreTrainedConfig) -> str:
    """transformers' name for our feature selection: `default` drops CLIP's CLS token, `full` keeps every token."""
    dropped = config.mm_vision_select_feature == "patch" and has_cls_token(config.vision_config)
    return "default" if dropped else "full"


def hf_llava_config(config: PreTrainedConfig) -> LlavaConfig:
    """The `LlavaConfig` of our config: the family's text config, the vision config, image token, feature layer
    and strategy."""
    if config.mm_projector_type != "mlp2x_gelu":
        raise ExportError(f"model.projector_type={config.mm_projector_type}: transformers' Llava has one projector, "
                          "Linear -> GELU -> Linear (mlp2x_gelu); export with --format llava instead")
    family_config = text_config_class(config.text_model_type)
    known = set(family_config().to_dict())
    text = {k: v for k, v in config.to_dict().items() if k in known}
    for key in ("model_type", "architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        text.pop(key, None)
    text_config = family_config(**text)
    return LlavaConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=config.image_token_id,
        image_seq_length=config.num_image_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=feature_select_strategy(config),
        vision_feature_layer=config.mm_vision_select_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(config.tie_word_embeddings),
    )


def hf_processor(tokenizer, image_processor, config: PreTrainedConfig, run_config: DictConfig) -> LlavaProcessor:
    """transformers' `LlavaProcessor` doing what our data pipeline does (see module doc). A SigLIP tower's processor
    resizes to a square without a crop: the Llava one gets the same size as its crop and no centre crop."""
    data = run_config.data
    size = {k: v for k, v in dict(image_processor.size).items() if v is not None}
    crop = getattr(image_processor, "crop_size", None)
    crop = {k: v for k, v in dict(crop).items() if v is not None} if crop is not None else dict(size)
    image_llava = LlavaImageProcessorPil(
        size=size, crop_size=crop, do_center_crop=bool(getattr(image_processor, "do_center_crop", False)),
        image_mean=list(image_processor.image_mean), image_std=list(image_processor.image_std),
        resample=image_processor.resample, do_pad=data.image_aspect_ratio == "pad", do_convert_rgb=True,
    )
    image_token = run_config.model.image_token
    template = chat_template_for(data.template, tokenizer, data.system_prompt, image_token)
    tokenizer.chat_template = template
    drop_implicit_bos(tokenizer, data.template, config.image_token_id, config.num_image_tokens, template)
    return LlavaProcessor(image_processor=image_llava, tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
                          vision_feature_select_strategy=feature_select_strategy(config), chat_template=template,
                          image_token=image_token,
                          num_additional_image_tokens=1 if has_cls_token(config.vision_config) else 0)


def export_hf_llava(run_dir: PathLike, out_dir: PathLike, merge: bool = True,
                    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE, dtype: Optional[str] = None,
                    overwrite: bool = False) -> Path:
    """Write `out_dir` loadable by `LlavaForConditionalGeneration` / `AutoProcessor.from_pretrained` (see
    module doc). `merge=False` writes the base with the run's projector and the peft adapter beside it in
    `adapter/` (keys renamed to the exported model's). `dtype` (`float32`, `bfloat16`, ...) casts the weights;
    by default they keep the run's dtype. `out_dir` must be new, empty, or (with `overwrite`) an earlier export
    of this kind; it is written whole or not at all (`vir.export.destination`). Returns `out_dir`."""
    run, out = Path(run_dir), Path(out_dir)
    check_destination(run, out, "hf", overwrite)
    model, tokenizer, image_processor, run_config = load_run(run, merge_adapter=merge, device="cpu",
                                                             dequantize=True)
    has_adapter = hasattr(model, "peft_config")
    base = model.get_base_model() if has_adapter else model
    config = base.config
    state = {k: v for k, v in base.state_dict().items() if "lora_" not in k}
    state = {re.sub(r"\.base_layer\.", ".", k): v for k, v in state.items()}
    hf_config = hf_llava_config(config)
    with torch.device("meta"):
        hf_model = LlavaForConditionalGeneration(hf_config)
    renamed = hf_state_dict(state)
    if dtype:
        renamed = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in renamed.items()}
    missing = set(hf_model.state_dict()) - set(renamed)
    if missing:
        raise ExportError(f"the run's weights lack {sorted(missing)[:5]} for LlavaForConditionalGeneration")
    hf_model.load_state_dict(renamed, strict=True, assign=True)
    hf_model.generation_config = _generation_config(tokenizer, run_config.data.template,
                                                    getattr(base, "generation_config", None))
    processor = hf_processor(tokenizer, image_processor, config, run_config)
    with staged_export(run, out, "hf") as staging:
        hf_model.save_pretrained(str(staging), max_shard_size=max_shard_size)
        processor.save_pretrained(str(staging))
        # What transformers 4.x (and tokenizers before 0.20) read as well: vir.export.portable.
        write_portable_tokenizer(staging)
        add_legacy_rope_fields(staging / "config.json", "text_config")
        nest_tower_keys(staging)
        # transformers 5 keeps the image processor inside processor_config.json; servers on older transformers
        # (vLLM, SGLang) read preprocessor_config.json: write both.
        processor.image_processor.save_pretrained(str(staging))
        if has_adapter:
            _write_adapter(model, staging / "adapter")
        quantization = run_config.model.llm.quantization
        write_model_card(staging, run, run_config, merged=merge and (run / ADAPTER_CONFIG_FILE).is_file(),
                         dequantized=quantization != "none", aspect_ratio=run_config.data.image_aspect_ratio,
                         text_model_type=config.text_model_type)
    logger.info("exported %s -> %s (LlavaForConditionalGeneration)", run, out)
    return out


def _generation_config(tokenizer, template: str, model_generation_config=None) -> GenerationConfig:
    """Greedy by default; stops at the template's end-of-turn token, the tokenizer's eos and every eos id of the
    checkpoint's own generation config (`generation_stop_ids`)."""
    stops = generation_stop_ids(template, tokenizer, model_generation_config)
    return GenerationConfig(do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id)


def _write_adapter(peft_model, adapter_dir: Path) -> None:
    """The peft adapter with its target names as the exported model has them (`model.language_model.*`)."""
    peft_model.save_pretrained(str(adapter_dir), save_embedding_layers=False)
    config_file = adapter_dir / ADAPTER_CONFIG_FILE
    adapter_config = json.loads(config_file.read_text())
    adapter_config["base_model_name_or_path"] = ".."
    config_file.write_text(json.dumps(adapter_config, indent=2))
    from safetensors.torch import load_file, save_file

    weights = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    renamed = {k.replace("base_model.model.model.", "base_model.model.model.language_model.", 1): v
               for k, v in tensors.items()}
    save_file(renamed, str(weights))

