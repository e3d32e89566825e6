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

from vir.export.card import write_model_card
from vir.models.checkpoint import ADAPTER_CONFIG_FILE, PathLike, load_run, write_run_artifacts
from vir.utils.errors import UserError

logger = logging.getLogger(__name__)

TOWER_DIR = "vision_tower"
# Fields LLaVA's `LlavaLlamaForCausalLM` / `load_pretrained_model` read beside ours (haotian-liu/LLaVA, v1.5).
LLAVA_FIELDS = {"mm_use_im_patch_token": False, "mm_patch_merge_type": "flat", "tune_mm_mlp_adapter": False,
                "freeze_mm_mlp_adapter": False, "tokenizer_padding_side": "right", "use_mm_proj": True}


def merge_run(run_dir: PathLike, out_dir: PathLike, max_shard_size: str = "5GB") -> Path:
    """Write `out_dir`: the run as full weights in our format (see module doc). Returns `out_dir`."""
    return _merge(run_dir, out_dir, max_shard_size)[0]


def _merge(run_dir: PathLike, out_dir: PathLike, max_shard_size: str):
    """`merge_run`, also returning the merged model and image processor it wrote."""
    run, out = Path(run_dir), Path(out_dir)
    if out.resolve() == run.resolve():
        raise UserError(f"the output directory {out} is the run directory: choose another")
    model, tokenizer, image_processor, run_config = load_run(run, merge_adapter=True, device="cpu", dequantize=True)
    quantization = run_config.model.llm.quantization
    run_config.model.llm.quantization = "none"  # the merged weights are plain `model.llm.dtype` tensors
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), max_shard_size=max_shard_size)
    write_run_artifacts(out, model, image_processor=image_processor, tokenizer=tokenizer, run_config=run_config)
    for name in ("metrics.json", "data_stats.json"):
        if (run / name).is_file():
            shutil.copy2(run / name, out / name)
    write_model_card(out, run, run_config, merged=(run / ADAPTER_CONFIG_FILE).is_file(),
                     dequantized=quantization != "none", aspect_ratio=run_config.data.image_aspect_ratio,
                     layout="vir")
    logger.info("merged %s -> %s", run, out)
    return out, model, image_processor


def export_llava_original(run_dir: PathLike, out_dir: PathLike, max_shard_size: str = "5GB") -> Path:
    """LLaVA's own layout: the merged checkpoint (`model_type` llava_llama, `mm_*` fields, `mm_projector.bin`,
    LLaVA's key names) with the CLIP tower copied into `vision_tower/`, which `mm_vision_tower` names."""
    out, model, image_processor = _merge(run_dir, out_dir, max_shard_size)
    tower = out / TOWER_DIR
    model.get_model().vision_tower.vision_tower.save_pretrained(str(tower))
    image_processor.save_pretrained(str(tower))
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    config.update(LLAVA_FIELDS, mm_vision_tower=str(tower.resolve()))
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    return out
