"""The export's README.md: what the directory holds, how to load and serve it, and the run it came from."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

_PAD_NOTE = {
    "pad": "Images are padded to a square with the processor's mean colour before resizing (LLaVA-1.5's `pad`): "
           "the exported `LlavaImageProcessor` does this itself (`do_pad: true`).",
    "crop": "Images are resized on their short side and centre-cropped (`crop`), as the exported processor does.",
}


def write_model_card(out: Path, run: Path, run_config: DictConfig, merged: bool, dequantized: bool,
                     aspect_ratio: str, layout: str = "hf") -> Path:
    """Write `out/README.md` with the run's config, data stats and metrics (when the run has them). `layout`:
    `hf` (transformers' Llava) or `vir` (our own run format: a merged checkpoint, LLaVA's original layout)."""
    metrics = _json(run / "metrics.json") or _json(run.parent / "metrics.json")
    stats = _json(run / "data_stats.json")
    lines = _vir_usage(run) if layout == "vir" else _hf_usage(run)
    if layout == "hf":
        lines.append("- " + _PAD_NOTE[aspect_ratio])
        lines.append(f"- The chat template is the one the model was trained with (`{run_config.data.template}`, "
                     "the image before the question). `processor.apply_chat_template(..., tokenize=True)` and "
                     "rendering first, then `processor(images=..., text=...)`, give the same ids: the tokenizer adds "
                     "a bos only where the template does not write one.")
    if merged:
        lines.append("- The LoRA adapter is merged into the weights"
                     + (" of the de-quantised base (the QLoRA run trained on 4/8-bit weights; these are those "
                        "weights de-quantised, so outputs can differ slightly from the quantised model)."
                        if dequantized else "."))
    elif (out / "adapter").is_dir():
        lines.append("- `adapter/` holds the LoRA adapter (peft) for these base weights; they are not merged.")
    if metrics:
        lines += ["", "## Metrics", "", "```json", json.dumps(_scores(metrics), indent=2), "```"]
    if stats:
        lines += ["", "## Training data", "", "```json",
                  json.dumps({k: v for k, v in stats.items() if isinstance(v, (int, float))}, indent=2), "```"]
    lines += ["", "## Training config", "", "```yaml", OmegaConf.to_yaml(run_config, resolve=True).rstrip(), "```", ""]
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path


def _hf_usage(run: Path) -> list:
    return [
        f"# {run.name} (exported by vir)",
        "",
        f"A LLaVA-1.5-style model fine-tuned with `vir` (`{run}`), as transformers' `LlavaForConditionalGeneration`.",
        "",
        "```python",
        "from transformers import AutoProcessor, LlavaForConditionalGeneration",
        "model = LlavaForConditionalGeneration.from_pretrained(PATH)",
        "processor = AutoProcessor.from_pretrained(PATH)",
        "messages = [{'role': 'user', 'content': [{'type': 'image', 'path': 'photo.jpg'},",
        "                                         {'type': 'text', 'text': 'What is in the picture?'}]}]",
        "inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,",
        "                                       return_dict=True, return_tensors='pt')",
        "print(processor.decode(model.generate(**inputs, max_new_tokens=64)[0, inputs['input_ids'].shape[1]:],",
        "                       skip_special_tokens=True))",
        "```",
        "",
        "Serve it with vLLM: `vllm serve PATH` (or `LLM(model=PATH)` offline).",
        "",
    ]


def _vir_usage(run: Path) -> list:
    return [
        f"# {run.name} (merged by vir)",
        "",
        f"`{run}` as one stand-alone checkpoint: full weights, `mm_projector.bin`, tokenizer, image processor and",
        "`vir_config.yaml`. `vir-eval PATH`, `vir-chat PATH` and `vir.models.checkpoint.load_run(PATH)` load it;",
        "its `config.json` (`model_type` llava_<family>, the `mm_*` fields) and key names are LLaVA's own.",
        "",
        "- Images are padded to a square with the mean colour (`image_aspect_ratio`: pad) or centre-cropped "
        "(crop), as the config says; vir's loaders do it.",
    ]


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _scores(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("accuracy", "blind_accuracy", "per_type", "n") if k in metrics}
