"""Training modes: which parameters train in `stage1`, `stage2_lora` and `stage2_full`.

- stage1: projector only (LLM and vision tower frozen); LLaVA's feature-alignment pre-training.
- stage2_lora: peft LoRA on the LLM's linear layers (never the projector, vision tower or lm_head), with
  the projector fully trained.
- stage2_full: LLM and projector fully trained.
The vision tower stays frozen in every mode unless `model.vision_tower.freeze=false` (stage1 and stage2_full
only: a LoRA run saves the adapter and the projector, which would not hold a trained tower).
"""

from __future__ import annotations

import logging
from typing import List

import torch
from torch import nn

from vir.models.quantization import is_quantized
from vir.utils.config import ConfigError

logger = logging.getLogger(__name__)

MODES = ("stage1", "stage2_lora", "stage2_full")
_EXCLUDED_FROM_LORA = ("mm_projector", "vision_tower", "lm_head")
# The same exclusion for peft (a module whose path holds one of them gets no adapter, whatever its short name).
LORA_EXCLUDED_PATTERN = r".*(" + "|".join(_EXCLUDED_FROM_LORA) + r").*"


def lora_target_modules(model: nn.Module) -> List[str]:
    """Short names of the LLM's linear layers (q_proj, ..., down_proj): LoRA's targets.

    The projector, the vision tower and lm_head are excluded by name, whatever their layer types.
    """
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not any(key in name for key in _EXCLUDED_FROM_LORA):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def keep_fp32(module: nn.Module, name: str) -> None:
    """Hold a trained module's weights in float32 when the model was loaded in half precision
    (`model.llm.dtype=bfloat16`): AdamW's steps (~1e-5 of a weight) are below bf16's resolution (~4e-3 of a
    weight) and would mostly round away. Its output is cast back to the LLM's dtype where it is used."""
    dtypes = {p.dtype for p in module.parameters()}
    if dtypes and dtypes != {torch.float32}:
        logger.info("%s trains in float32 (loaded as %s)", name, ", ".join(sorted(str(d) for d in dtypes)))
        module.float()


def prepare_kbit_model(model: nn.Module) -> nn.Module:
    """Freeze a quantized model for QLoRA. In bfloat16 its frozen full-precision weights (embeddings, lm_head,
    norms, the vision tower) keep that dtype: bf16 has fp32's range, and peft's `prepare_model_for_kbit_training`
    upcast to fp32 would cost Llama-3-8B 2.5 GiB more (embeddings and lm_head alone are 1.05B weights) and turn the
    residual stream, so every checkpointed activation, fp32. In float16 that upcast is what keeps training stable,
    and peft's preparation runs as it is. Gradient checkpointing is the Trainer's to switch on."""
    if model.get_input_embeddings().weight.dtype == torch.bfloat16:
        model.requires_grad_(False)  # all prepare_model_for_kbit_training does besides the upcast
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def check_mode(mode: str, vision_tower_freeze: bool) -> None:
    """Raise `ConfigError` for an unknown `training.mode`, or LoRA with a trained tower."""
    if mode not in MODES:
        raise ConfigError(f"training.mode={mode!r} is not one of {', '.join(MODES)}")
    if mode == "stage2_lora" and not vision_tower_freeze:
        # The adapter and mm_projector.bin are all a LoRA run saves: a trained tower would be lost on reload.
        raise ConfigError("training.mode=stage2_lora cannot train the vision tower (model.vision_tower.freeze=false): "
                          "its weights would be in neither the adapter nor mm_projector.bin. Keep the tower frozen "
                          "or use training.mode=stage2_full")


def apply_training_mode(model: nn.Module, training_cfg, vision_tower_freeze: bool = True) -> nn.Module:
    """Freeze/unfreeze (and wrap with LoRA for `stage2_lora`) according to `training.mode`.

    Returns the model to train: the same object, or a `peft.PeftModel` around it.
    """
    mode = training_cfg.mode
    check_mode(mode, vision_tower_freeze)
    base = model
    base.loss_chunk_size = getattr(training_cfg, "loss_chunk_size", 0)  # the training loss (vir.models.loss)
    if is_quantized(base):
        if mode != "stage2_lora":
            raise ValueError("model.llm.quantization loads the LLM as frozen 4/8-bit weights: it trains with "
                             f"training.mode=stage2_lora (QLoRA), not training.mode={mode}")
        base = prepare_kbit_model(base)
    if mode == "stage2_lora":
        from peft import LoraConfig, get_peft_model

        lora_config = LoraConfig(
            r=training_cfg.lora_r,
            lora_alpha=training_cfg.lora_alpha,
            lora_dropout=training_cfg.lora_dropout,
            target_modules=lora_target_modules(base),
            exclude_modules=LORA_EXCLUDED_PATTERN,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, lora_config)  # freezes every non-LoRA parameter
    else:
        base.requires_grad_(mode == "stage2_full")
    inner = base.get_model()
    inner.mm_projector.requires_grad_(True)
    keep_fp32(inner.mm_projector, "mm_projector")
    inner.vision_tower.requires_grad_(not vision_tower_freeze)
    if mode == "stage2_full":
        # Tied or not, lm_head trains with the LLM in full fine-tuning.
        base.lm_head.requires_grad_(True)
    return model
