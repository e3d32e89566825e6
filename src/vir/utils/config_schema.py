"""Typed defaults for every config key, registered in Hydra's ConfigStore.

The dataclasses here are the single source of truth for what a key is called and what type it has.
`conf/config.yaml` puts `vir_schema` first in its defaults list, so every YAML file and every command-line
override is merged onto these types: a misspelt key fails at start-up naming the key (and its section),
instead of being silently ignored.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, make_dataclass
from importlib.metadata import entry_points
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

# The weight dtypes a key or flag may name (`model.llm.dtype`, `vir-export --dtype`, `vir-demo --dtype`).
DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclass
class LLMConfig:
    """The language model. `path` points at a local HF directory of any decoder-only causal LM (Llama, Mistral,
    Qwen2/3, Gemma 2/3, Phi-3, ...: its config.json says which) and must be given (`???` until then); `null`
    builds a random-init LLM of the family `model_type` from the size fields below (model=tiny, tests, the
    embedded demo, the planner's real shapes)."""

    path: Optional[str] = "???"
    # The fields below shape a random-init LLM only (`path: null`); with a path, its config.json decides.
    model_type: str = "llama"  # the decoder family: llama | mistral | qwen2 | qwen3 | gemma2 | gemma3_text | phi3 ...
    vocab_size: Optional[int] = None  # null: the tokenizer's length
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    rope_theta: float = 500000.0
    head_dim: Optional[int] = None  # null: hidden_size / num_attention_heads
    tie_word_embeddings: Optional[bool] = None  # null: the family's default (tied for Gemma)
    extra_config: Dict[str, Any] = field(default_factory=dict)  # any other field of the family's config
    dtype: str = "float32"  # one of DTYPE_NAMES
    attn_implementation: str = "sdpa"
    # QLoRA: load the LLM's linear layers in 4-bit nf4 (or 8-bit) with bitsandbytes; the vision tower, the
    # projector and lm_head stay in full precision. Needs `path` and training.mode=stage2_lora.
    quantization: str = "none"  # none | nf4 | int8
    double_quant: bool = True  # nf4: quantize the quantization constants too (~0.4 bit a weight less)


@dataclass
class VisionTowerConfig:
    """The vision tower. `path` points at a local HF CLIP or SigLIP directory (full or vision-only) and must be
    given; `null` builds a random-init tower of the kind `model_type` from the size fields below."""

    path: Optional[str] = "???"
    model_type: str = "clip_vision_model"  # clip_vision_model | siglip_vision_model (random init only)
    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    select_layer: int = -2  # LLaVA's mm_vision_select_layer
    select_feature: str = "patch"  # patch (every patch token; CLIP's CLS dropped) | cls_patch (CLIP only)
    freeze: bool = True


@dataclass
class ModelConfig:
    llm: LLMConfig = field(default_factory=LLMConfig)
    vision_tower: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    projector_type: str = "mlp2x_gelu"  # linear | mlp2x_gelu | identity
    # A projector to start from: LLaVA's `mm_projector.bin` (e.g. the stage-1 output), or an original LLaVA LoRA
    # run's `non_lora_trainables.bin`. Optional.
    pretrained_projector: Optional[str] = None
    # Continue from a transformers Llava directory (`llava-hf/*`): it is split into <training.output_dir>/
    # init_from_hf/{llm,clip,mm_projector.bin}, which then stand for model.llm.path, model.vision_tower.path and
    # model.pretrained_projector (leave those unset); the tower's feature layer and selection come from it too.
    init_from_hf: Optional[str] = None
    # Tokenizer directory; `null` means the LLM's directory.
    tokenizer_path: Optional[str] = None
    image_token: str = "<image>"
    # Pad token to use when the tokenizer has none; `null` picks Llama-3's `<|finetune_right_pad_id|>` when
    # the vocabulary has it, else adds `<pad>`.
    pad_token: Optional[str] = None
    model_max_length: int = 2048


@dataclass
class DataConfig:
    train_path: Optional[str] = None
    eval_path: Optional[str] = None
    test_path: Optional[str] = None
    image_folder: Optional[str] = None
    template: str = "llama3"  # llama3 | plain
    system_prompt: Optional[str] = None
    image_aspect_ratio: str = "pad"  # pad (square with the processor's mean colour) | crop
    num_workers: int = 0
    # At most this many fallback warnings (corrupt / missing / refused image) are logged per dataset.
    max_image_warnings: int = 20
    # Padding-free batches (vir.data.packing): a micro-batch's samples share rows, position ids restarting per
    # sample, attention never crossing samples; same loss and gradients as padding. Rows hold up to
    # `pack_row_tokens` tokens (raised to the longest sample; null: the longest sample, padding's row width).
    packing: bool = True
    pack_row_tokens: Optional[int] = 1024


@dataclass
class TrainingConfig:
    output_dir: str = "runs/default"
    mode: str = "stage2_lora"  # stage1 | stage2_lora | stage2_full
    num_train_epochs: float = 1.0
    max_steps: int = -1
    # Set the global batch once (LLaVA's 256 for stage 1, 128 for stage 2) and per-device micro-batch and
    # gradient accumulation follow from the number of processes; `per_device_train_batch_size` is then the
    # largest micro-batch a device may take. Null: the two keys below are used as given.
    global_batch_size: Optional[int] = None
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    mm_projector_lr: Optional[float] = None
    vision_tower_lr: Optional[float] = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler_type: str = "cosine"
    logging_steps: int = 10
    eval_steps: Optional[int] = None
    save_steps: int = 500
    save_total_limit: Optional[int] = None
    group_by_modality_length: bool = False
    # > 1: modality grouping (implied) with megabatches of this many optimizer-step batches, sorted by length
    # and cut into batches of similar length (1 = LLaVA's grouping alone, which pads as much as no grouping
    # on one process; HF's group_by_length uses 50).
    length_grouping: int = 1
    # Cut training micro-batches by tokens instead of samples: each holds up to this many tokens (packed ones
    # with data.packing, else padded ones), many short samples or few long ones; per_device_train_batch_size
    # then sizes evaluation only. Null: per_device_train_batch_size samples.
    max_tokens_per_batch: Optional[int] = None
    gradient_checkpointing: bool = False
    # DeepSpeed ZeRO: zero2 | zero3 | zero3_offload (shipped in vir/conf/deepspeed/) or a JSON file; null = plain
    # DDP. Run under torchrun / accelerate launch / deepspeed with one process per device.
    deepspeed: Optional[str] = None
    bf16: bool = False
    fp16: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    report_to: List[str] = field(default_factory=lambda: ["tensorboard"])
    # null: start fresh; `auto`: continue from the newest complete checkpoint in output_dir (or start fresh when
    # there is none; a finished run with the same config is not trained again); or a checkpoint-N directory.
    resume_from_checkpoint: Optional[str] = None
    # A directory holding another run (another identity: vir.training.ownership) is refused; true replaces that
    # run (its checkpoints, weights and records are removed) with this one. A directory holding this very run is
    # resumed or reported finished as usual, so a requeued job that passes it again loses nothing.
    overwrite_output_dir: bool = False
    # The training loss projects only the positions that train through lm_head, this many at a time, never the
    # full [batch, length, vocab] fp32 logits (vir.models.loss); 0: transformers' loss over full logits.
    loss_chunk_size: int = 1024
    # An optimizer step whose gradients are not finite (NaN/inf loss) is skipped with a warning; this many in a
    # row stop the run with a clear error, the checkpoints written so far intact.
    max_nonfinite_steps: int = 10
    extra_args: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ValidateConfig:
    """`vir-validate` options."""

    split: str = "train"  # train | eval | test
    dump_dir: Optional[str] = None
    max_records: Optional[int] = None


@dataclass
class PlanConfig:
    """`vir-plan` options: the device to fit and the run's scale."""

    gpu_gb: float = 24.0  # memory of one device, GiB
    world_size: int = 1  # training processes (GPUs) the run will use
    vocab_size: Optional[int] = None  # without model.llm.path; null: Llama-3's 128256
    # Tokens per sample to plan for; null: model.model_max_length (the longest a sample can be). LLaVA's stage-1
    # captions are ~650 tokens with their image, its stage-2 conversations ~1000 on average.
    sequence_length: Optional[int] = None
    output: str = "table"  # table | json


@dataclass
class RecipeConfig:
    """What `vir-train` runs: `name` is a recipe registered under the `vir.recipes` entry-point group.

    `single` (the library's own, `vir.training.finetune`): one training stage exactly as `training.*` and
    `data.*` say, on a user's own data and model directories. Extensions add others (the embedded demo's
    `synthetic_llava`, whose settings live in its own `demo` section).
    """

    name: str = "single"
    eval_max_new_tokens: int = 16  # greedy answers on data.test_path after training, and in the visualiser
    eval_batch_size: int = 64
    num_visualizer_samples: int = 8  # eval records whose greedy answers are drawn at every evaluation


@dataclass
class VirConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    seed: int = 42
    experiment_name: str = "default"


# Extensions (the embedded demo among them) add a typed top-level section each through this entry-point group:
# `name = "package.module:Dataclass"` becomes the section `name`, null unless an experiment or override fills it,
# checked like the library's own keys. The library never imports them by name.
SECTION_ENTRY_POINTS = "vir.config_sections"


@functools.lru_cache(maxsize=None)
def schema() -> type:
    """`VirConfig` with every registered extension section (`SECTION_ENTRY_POINTS`) added as an optional field."""
    sections = sorted(entry_points(group=SECTION_ENTRY_POINTS), key=lambda ep: ep.name)
    if not sections:
        return VirConfig
    extra = [(ep.name, Optional[ep.load()], field(default=None)) for ep in sections]
    return make_dataclass("VirConfig", extra, bases=(VirConfig,))


def register_configs() -> None:
    """Register the schema so `conf/config.yaml` can name `vir_schema` in its defaults list."""
    cs = ConfigStore.instance()
    cs.store(name="vir_schema", node=schema())
