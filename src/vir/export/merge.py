"""A run folded into one stand-alone checkpoint of our own format (`vir-merge`), and LLaVA's original layout
(`vir-export --format llava`), which is the same checkpoint plus what LLaVA's loader expects.

The merged directory holds full weights (`model.safetensors`, LoRA folded into the base, a QLoRA base
de-quantised first), `mm_projector.bin`, the tokenizer, the image processor and `vir_config.yaml`, so
`load_run`, `vir-eval` and `vir-chat` load it like any full-weight run, with no base directories needed.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch
from omegaconf import DictConfig

from vir.export.card import write_model_card
from vir.export.chat_template import chat_template_for, drop_implicit_bos
from vir.export.destination import check_destination, staged_export
from vir.export.portable import add_legacy_rope_fields, nest_tower_keys, write_portable_tokenizer
from vir.models.checkpoint import ADAPTER_CONFIG_FILE, load_run, require_run_dir, write_run_artifacts
from vir.utils.errors import UserError
from vir.utils.paths import PathLike

logger = logging.getLogger(__name__)

TOWER_DIR = "vision_tower"
# Fields LLaVA's `LlavaLlamaForCausalLM` / `load_pretrained_model` read beside ours (haotian-liu/LLaVA, v1.5).
LLAVA_FIELDS = {"mm_use_im_patch_token": False, "mm_patch_merge_type": "flat", "tune_mm_mlp_adapter": False,
                "freeze_mm_mlp_adapter": False, "tokenizer_padding_side": "right", "use_mm_proj": True}


class Merged(NamedTuple):
    """A run loaded with LoRA folded in, and what its merged checkpoint records."""

    run: Path
    model: torch.nn.Module
    tokenizer: Any
    image_processor: Any
    run_config: DictConfig
    dequantized: bool


def merge_run(run_dir: PathLike, out_dir: PathLike, max_shard_size: str = "5GB", overwrite: bool = False) -> Path:
    """Write `out_dir`: the run as full weights in our format (see module doc). `out_dir` must be new, empty,
    or (with `overwrite`) an earlier `vir-merge` output; it is written whole or not at all
    (`vir.export.destination`). Returns `out_dir`."""
    check_destination(run_dir, out_dir, "merge", overwrite)
    merged = load_merged(run_dir)
    with staged_export(run_dir, out_dir, "merge") as staging:
        write_merged(merged, staging, max_shard_size)
    return Path(out_dir)


def load_merged(run_dir: PathLike) -> Merged:
    """The run on the CPU with LoRA merged (a QLoRA base de-quantised first)."""
    run = Path(run_dir)
    model, tokenizer, image_processor, run_config = load_run(run, merge_adapter=True, device="cpu", dequantize=True)
    dequantized = run_config.model.llm.quantization != "none"
    run_config.model.llm.quantization = "none"  # the merged weights are plain `model.llm.dtype` tensors
    return Merged(run, model, tokenizer, image_processor, run_config, dequantized)


def write_merged(merged: Merged, out: Path, max_shard_size: str) -> None:
    """Write `merged` into the directory `out` as a stand-alone checkpoint of our format."""
    run, model, run_config = merged.run, merged.model, merged.run_config
    model.save_pretrained(str(out), max_shard_size=max_shard_size)
    write_run_artifacts(out, model, image_processor=merged.image_processor, tokenizer=merged.tokenizer,
                        run_config=run_config)
    for name in ("metrics.json", "data_stats.json"):
        if (run / name).is_file():
            shutil.copy2(run / name, out / name)
    write_model_card(out, run, run_config, merged=(run / ADAPTER_CONFIG_FILE).is_file(),
                     dequantized=merged.dequantized, aspect_ratio=run_config.data.image_aspect_ratio, layout="vir")
    logger.info("merged %s -> %s", run, out)


def export_llava_original(run_dir: PathLike, out_dir: PathLike, max_shard_size: str = "5GB",
                          overwrite: bool = False, vision_tower_id: Optional[str] = None) -> Path:
    """LLaVA's own layout, which haotian-liu/LLaVA's `load_pretrained_model` (transformers 4.36, tokenizers 0.15)
    loads from wherever the directory is moved: the merged checkpoint (`model_type` llava_llama, `mm_*` fields,
    `mm_projector.bin`, LLaVA's key names) with the CLIP tower copied into `vision_tower/` (`write_llava_files`).
    `mm_vision_tower` is `vision_tower`, relative to the export, or `vision_tower_id` (a hub id such as
    `openai/clip-vit-large-patch14-336`, for a run whose tower is that checkpoint, untrained). `out_dir` is checked
    and written as `merge_run`'s is."""
    check_destination(run_dir, out_dir, "llava", overwrite)
    _check_llava_loads(Path(run_dir))
    merged = load_merged(run_dir)
    if vision_tower_id and not merged.run_config.model.vision_tower.freeze:
        raise UserError(f"--vision-tower-id {vision_tower_id}: this run trained its vision tower "
                        "(model.vision_tower.freeze=false), so the checkpoint that id names is not its tower; "
                        "leave --vision-tower-id out to reference the trained tower in vision_tower/")
    with staged_export(run_dir, out_dir, "llava") as staging:
        write_merged(merged, staging, max_shard_size)
        write_llava_files(merged, staging, vision_tower_id or TOWER_DIR, Path(out_dir).name)
    return Path(out_dir)


def write_llava_files(merged: Merged, out: Path, vision_tower: str, name: str) -> None:
    """What LLaVA's loader reads beside a merged checkpoint in `out`, in the forms transformers 4.x and tokenizers
    0.15 read (`vir.export.portable`): the tower and its image processor in `vision_tower/` (keys under
    `vision_model.`), LLaVA's config fields with `mm_vision_tower` set to `vision_tower` and `rope_theta` written
    out, the tokenizer with the training chat template, adding a bos only where the template writes none
    (`drop_implicit_bos`), and a README on loading and prompting it (`name`: the directory's final name)."""
    tower = out / TOWER_DIR
    merged.model.get_model().vision_tower.vision_tower.save_pretrained(str(tower))
    merged.image_processor.save_pretrained(str(tower))
    nest_tower_keys(tower, tower_prefixes=("",))
    data = merged.run_config.data
    tokenizer = merged.tokenizer
    config = merged.model.config
    tokenizer.chat_template = chat_template_for(data.template, tokenizer, data.system_prompt,
                                                merged.run_config.model.image_token)
    drop_implicit_bos(tokenizer, data.template, config.image_token_id, config.num_image_tokens,
                      tokenizer.chat_template)
    tokenizer.save_pretrained(str(out))
    write_portable_tokenizer(out)
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    config.update(LLAVA_FIELDS, mm_vision_tower=vision_tower)
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    add_legacy_rope_fields(config_file)
    write_model_card(out, merged.run, merged.run_config, merged=(merged.run / ADAPTER_CONFIG_FILE).is_file(),
                     dequantized=merged.dequantized, aspect_ratio=data.image_aspect_ratio, layout="llava",
                     vision_tower=vision_tower, export_name=name)


# What LLaVA's own `load_pretrained_model` builds: LlavaLlamaForCausalLM / LlavaMistralForCausalLM, a CLIP tower.
LLAVA_LOADABLE = {"llava_llama", "llava_mistral"}


def _check_llava_loads(run: Path) -> None:
    """Refuse a run LLaVA's own code could not load: another LLM family, or a SigLIP tower."""
    config = json.loads((require_run_dir(run) / "config.json").read_text())
    tower = (config.get("vision_config") or {}).get("model_type", "clip_vision_model")
    if config.get("model_type") not in LLAVA_LOADABLE or tower != "clip_vision_model":
        raise UserError(f"{run} is a {config.get('model_type')} model with a {tower} tower; LLaVA's own loader builds "
                        f"only {' or '.join(sorted(LLAVA_LOADABLE))} with a CLIP tower: export it with --format hf "
                        "(transformers' LlavaForConditionalGeneration) instead")
