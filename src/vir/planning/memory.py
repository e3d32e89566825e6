"""Peak GPU memory per device for a training config, from shapes alone (`vir-plan`).

The model is built on the meta device from the config's shapes (no weights, no tokenizer), and each
parameter is assigned the bytes the training path gives it:
- The LLM is in `model.llm.dtype`. Under QLoRA its decoder linears take 4 or 8 bits plus quantization
  constants; every other weight stays in bf16, or, in fp16, is cast to fp32 by `prepare_model_for_kbit_training`
  (`vir.training.modes.prepare_kbit_model`).
- LoRA adapters and a trained projector are fp32.
- Gradients have the dtype of the parameter they belong to.
- AdamW keeps two states in the parameter's dtype. Under DeepSpeed a half-precision parameter also gets an
  fp32 master copy.
- ZeRO stages 1-3 divide optimizer states, gradients and weights over the processes; offload moves them off
  the GPU.
Activations are the tensors a decoder layer saves for backward (`layer_saved_bytes`, read off the real layer),
for every layer or, under gradient checkpointing, each layer's input plus one layer recomputed. Logits are the
loss's fp32 tensors for one chunk of positions. The peak is the largest of three moments of a step (`plan_memory`).
`make plan-check` compares it with steps measured by `vir.planning.probe`; tests/test_planning.py repeats part.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

import torch
from torch import nn

from transformers import PreTrainedConfig

from vir.models.builder import (
    DTYPES,
    build_model_config,
    build_tokenizer,
    llm_fields_from_sizes,
    random_init_family,
    vision_config,
)
from vir.models.families import llava_classes, llava_model_class
from vir.training.batching import batch_layout
from vir.training.deepspeed_config import resolve_deepspeed
from vir.training.modes import lora_target_modules

GB = 1024**3
LLAMA3_VOCAB = 128256
# Bytes per quantized weight, quantization constants included (blocks of 64: an fp32 absmax each, or with double
# quantization an 8-bit absmax each plus an fp32 constant per 256 blocks).
_QUANT_BYTES = {("nf4", False): 0.5 + 4 / 64, ("nf4", True): 0.5 + 1 / 64 + 4 / (64 * 256), ("int8", False): 1 + 4 / 4096,
                ("int8", True): 1 + 4 / 4096}


@dataclass
class MemoryPlan:
    """Estimated peak GPU memory of one training process, in GiB, and what is alive at that moment (`peak_at`):
    the loss, when its logits are alive, or backward through a layer (recomputed under checkpointing)."""

    weights_gb: float
    grads_gb: float
    optimizer_gb: float
    activations_gb: float
    logits_gb: float
    peak_gb: float
    peak_at: str
    gpu_gb: float
    fits: bool
    trainable_parameters: int
    total_parameters: int
    micro_batch: int
    sequence_length: int
    world_size: int
    zero_stage: int

    def to_json(self) -> str:
        return json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}, indent=2)

    def table(self) -> str:
        rows = [("weights", self.weights_gb), ("gradients", self.grads_gb), ("optimizer", self.optimizer_gb),
                ("activations", self.activations_gb), ("logits", self.logits_gb), ("peak", self.peak_gb)]
        lines = [f"{name:<12}{value:>9.2f} GiB" for name, value in rows]
        lines[-1] += f"  (during {self.peak_at}; the parts above are what is alive then)"
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"{verdict} in {self.gpu_gb:g} GiB per device (micro-batch {self.micro_batch} x "
                     f"{self.sequence_length} tokens, {self.world_size} process(es), ZeRO-{self.zero_stage}; "
                     f"{self.trainable_parameters / 1e6:.1f}M of {self.total_parameters / 1e9:.2f}B parameters train)")
        return "\n".join(lines)


def planning_config(model_cfg: Any, vocab_size: Optional[int] = None) -> PreTrainedConfig:
    """The LLaVA config (of the LLM's family) with the shapes a run of `model.*` trains. With `model.llm.path` it
    is the run's own (`build_model_config`: the checkpoint's shapes, the vocabulary grown for its tokenizer);
    without it, the size fields of `model.llm` (family `model.llm.model_type`) and `vocab_size` (else
    `model.llm.vocab_size`, else Llama-3's 128256), no tokenizer needed."""
    if model_cfg.llm.path:
        return build_model_config(model_cfg, build_tokenizer(model_cfg))
    vocab = vocab_size or getattr(model_cfg.llm, "vocab_size", None) or LLAMA3_VOCAB
    config_class = llava_classes(random_init_family(model_cfg.llm))[0]
    return config_class(vocab_size=vocab, image_token_id=vocab - 1,
                            vision_config=vision_config(model_cfg.vision_tower),
                            mm_projector_type=model_cfg.projector_type,
                            mm_vision_select_layer=model_cfg.vision_tower.select_layer,
                            mm_vision_select_feature=model_cfg.vision_tower.select_feature,
                            **llm_fields_from_sizes(model_cfg.llm))


def zero_settings(training_cfg: Any) -> Dict[str, Any]:
    """{"stage": 0-3, "offload_optimizer": bool, "offload_param": bool} from `training.deepspeed`."""
    path = resolve_deepspeed(training_cfg.deepspeed)
    if path is None:
        return {"stage": 0, "offload_optimizer": False, "offload_param": False}
    zero = json.loads(open(path).read()).get("zero_optimization", {})
    offload = lambda key: zero.get(key, {}).get("device", "none") not in ("none", None)  # noqa: E731
    return {"stage": int(zero.get("stage", 0)), "offload_optimizer": offload("offload_optimizer"),
            "offload_param": offload("offload_param")}


@dataclass
class StateBytes:
    """Bytes one process holds for the whole run: weights, gradients (once created), optimizer states."""

    weights: float
    grads: float
    optimizer: float
    trainable: int
    total: int


def state_bytes(cfg: Any, model: nn.Module, world: int, zero: Dict[str, Any]) -> StateBytes:
    """Weights, gradients and AdamW states of `model` (built on the meta device) trained as `cfg` says."""
    training, llm = cfg.training, cfg.model.llm
    half = DTYPES[llm.dtype].itemsize
    quantized = llm.quantization != "none"
    targets = set(lora_target_modules(model)) if training.mode == "stage2_lora" else set()
    weights = grads = optimizer = 0.0
    trainable = total = 0
    master = 4 if zero["stage"] else 0  # DeepSpeed keeps an fp32 master copy of a half-precision parameter
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            n = param.numel()
            total += n
            is_llm_linear = full.startswith("model.layers.") and isinstance(module, nn.Linear)
            projector = full.startswith("model.mm_projector.")
            tower = full.startswith("model.vision_tower.")
            trains = (projector or (training.mode == "stage2_full" and not tower)
                      or (tower and not cfg.model.vision_tower.freeze))
            if quantized and is_llm_linear:
                weights += n * _QUANT_BYTES[(llm.quantization, bool(llm.double_quant))]
            elif projector or (quantized and llm.dtype == "float16"):  # a trained projector is fp32, so is the
                weights += n * 4  # rest of an fp16 4-bit model after peft's preparation
            else:
                weights += n * half
            if is_llm_linear and name.rsplit(".", 1)[-1] in targets:
                adapter = training.lora_r * (module.in_features + module.out_features)
                weights += adapter * 4
                grads += adapter * 4
                optimizer += adapter * 8
                trainable += adapter
            if trains:
                dtype_bytes = 4 if (projector or quantized) else half
                trainable += n
                grads += n * dtype_bytes
                optimizer += n * (8 if dtype_bytes == 4 else 2 * half + master)
    if zero["stage"] >= 1:
        optimizer = 0.0 if zero["offload_optimizer"] else optimizer / world
    if zero["stage"] >= 2:
        grads /= world
    if zero["stage"] >= 3:
        weights = 0.0 if zero["offload_param"] else weights / world
    return StateBytes(weights, grads, optimizer, int(trainable), int(total))


def plan_memory(cfg: Any, vocab_size: Optional[int] = None, world_size: Optional[int] = None,
                gpu_gb: Optional[float] = None) -> MemoryPlan:
    """The memory plan of `cfg` (a composed config) per training process.

    Besides weights and optimizer states, a step's peak is one of three moments:
    - the loss: the activations kept for backward and the logits;
    - backward through the last layer: the kept activations, that layer recomputed (under checkpointing) and its
      largest gradients;
    - backward through the first layer: every gradient, the checkpointed inputs, one layer and its gradients.
    Gradients already exist at the first two when they outlive a step: under gradient accumulation, or with
    DeepSpeed, which keeps them in buffers of its own.
    """
    plan_cfg, training, llm = cfg.plan, cfg.training, cfg.model.llm
    world = world_size or plan_cfg.world_size
    config = planning_config(cfg.model, vocab_size or plan_cfg.vocab_size)
    with torch.device("meta"):
        model = llava_model_class(config)(config)
    zero = zero_settings(training)
    state = state_bytes(cfg, model, world, zero)
    micro, accumulation = batch_layout(training, world)
    seq = plan_cfg.sequence_length or cfg.model.model_max_length
    tokens = micro * seq
    # bf16 QLoRA keeps its frozen weights, so its residual stream, in bf16; fp16 QLoRA's are upcast to fp32
    stream = 4 if llm.quantization != "none" and llm.dtype == "float16" else DTYPES[llm.dtype].itemsize
    kind = {"stage2_lora": "lora", "stage2_full": "full"}.get(training.mode, "frozen")
    layer = tokens * layer_saved_bytes(config, stream, kind, training.lora_r, training.lora_dropout)
    # With checkpointing every layer keeps its input only, and backward recomputes one layer at a time.
    inputs = config.num_hidden_layers * tokens * stream * config.hidden_size
    kept = inputs if training.gradient_checkpointing else config.num_hidden_layers * layer
    # Backward through a layer adds its largest gradients: the MLP's gate and up outputs' in the stream's dtype
    # and a fp32 one of the same width (LoRA's input gradient, the SiLU's).
    backward = tokens * config.intermediate_size * (2 * stream + 4)
    # Logits at the start of backward, 12 bytes a logit in any dtype: cross-entropy's saved fp32 log-softmax, the
    # fp32 gradient arriving at it and the one it passes on (measured, tests/test_planning.py). For every position
    # with transformers' loss; for one chunk of trained positions with the chunked one (training.loss_chunk_size,
    # vir.models.loss).
    rows = tokens if training.loss_chunk_size <= 0 else min(training.loss_chunk_size, tokens)
    logits = rows * config.vocab_size * 12
    grads_early = state.grads if accumulation > 1 or zero["stage"] else 0.0
    recomputed = layer if training.gradient_checkpointing else 0
    moments = {  # (gradients, activations, logits)
        "the loss": (grads_early, kept, logits),
        "backward through the last layer": (grads_early, kept + recomputed + backward, 0.0),
        "backward through the first layer": (state.grads, (inputs if training.gradient_checkpointing else 0)
                                             + layer + backward, 0.0),
    }
    peak_at = max(moments, key=lambda name: sum(moments[name]))
    grads, activations, logits_now = moments[peak_at]
    parts = [x / GB for x in (state.weights, grads, state.optimizer, activations, logits_now)]
    peak = sum(parts)
    budget = gpu_gb or plan_cfg.gpu_gb
    return MemoryPlan(*parts, peak, peak_at, budget, peak <= budget, state.trainable, state.total, micro, seq, world,
                      zero["stage"])


def layer_saved_bytes(config: PreTrainedConfig, dtype_bytes: int, kind: str, lora_r: int = 0,
                      lora_dropout: float = 0.0) -> int:
    """Bytes one Llama decoder layer saves for backward per token: `kind` is "frozen" (nothing in it trains, the
    gradient still flows to the image features), "full" (its weights train) or "lora" (peft LoRA on all seven
    linears). Read off transformers 5.24's LlamaDecoderLayer and peft 0.21's LoRA with saved-tensor hooks (SDPA);
    tests/test_planning.py re-measures it, so a library that saves more fails there:
    - every kind: k and v (2 h_kv), attention's log-sum-exp per head and the norms' rsqrt in fp32 (4 heads + 8);
    - frozen: 12 bytes per hidden unit (norm internals, q, the attention output) and 3 of the MLP's tensors;
      full adds what the weight gradients need: the norm outputs (4 d + 12 per hidden unit) and a 4th MLP tensor;
    - LoRA adds a fp32 r-vector per linear (4 r each), and per input feature of each adapted linear: dropout's
      fp32 mask and output (8 bytes), or without dropout the fp32 copy of the input peft makes (4 bytes; in fp32
      only the two norm outputs and the MLP product, which the frozen base no longer keeps)."""
    h, i, d = config.hidden_size, config.intermediate_size, dtype_bytes
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    h_kv = head_dim * config.num_key_value_heads
    shared = 2 * d * h_kv + 4 * config.num_attention_heads + 8
    if kind == "full":
        return shared + (4 * d + 12) * h + 4 * d * i
    frozen = shared + 12 * h + 3 * d * i
    if kind == "frozen":
        return frozen
    if lora_dropout > 0:
        adapters = 8 * (6 * h + i)
    else:
        adapters = 4 * (6 * h + i) if d < 4 else 4 * (2 * h + i)
    return frozen + adapters + 7 * 4 * lora_r
