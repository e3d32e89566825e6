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


# The transformers releases `--format hf` exports were read with, computing what vir computes (docs/interop.md), by
# the LLM's model_type; the 4.x half is `make interop-check` (Llama) and the family runs measured under 4.57.6.
HF_CHECKED_WITH = {family: "transformers 4.57.6 and 5.24 (the oldest: 4.57.6)"
                   for family in ("llama", "mistral", "phi3", "qwen2", "qwen3", "gemma3_text")}
HF_CHECKED_WITH["gemma2"] = ("transformers 5.24 (under 4.57.6 Gemma 2's image logits differ by up to 1.6, though its "
                             "greedy answers were equal)")


def checked_with_note(text_model_type: str) -> str:
    """The export README's line on the oldest transformers this kind of export was checked with."""
    checked = HF_CHECKED_WITH.get(text_model_type, "transformers 5.24 only (this model family has not been checked "
                                                   "under transformers 4.x)")
    return (f"Checked with {checked}. transformers 4.x's `LlavaImageProcessor` drops an image's alpha channel, "
            "where vir and transformers 5 composite transparent pixels on white: under 4.x composite them first, "
            "`Image.alpha_composite(Image.new('RGBA', image.size, 'white'), image.convert('RGBA')).convert('RGB')`.")


def write_model_card(out: Path, run: Path, run_config: DictConfig, merged: bool, dequantized: bool,
                     aspect_ratio: str, layout: str = "hf", vision_tower: str = "vision_tower",
                     text_model_type: str = "llama", export_name: str | None = None) -> Path:
    """Write `out/README.md` with the run's config, data stats and metrics (when the run has them). `layout`:
    `hf` (transformers' Llava), `vir` (our own run format: a merged checkpoint) or `llava` (LLaVA's original
    layout, whose `mm_vision_tower` is `vision_tower`); `text_model_type`, the LLM's, says which transformers
    releases an `hf` export was checked with; `export_name`, the directory's final name (`out` may be staging)."""
    metrics = _json(run / "metrics.json") or _json(run.parent / "metrics.json")
    stats = _json(run / "data_stats.json")
    if layout == "llava":
        lines = llava_usage(export_name or out.name, run, vision_tower)
    else:
        lines = _vir_usage(run) if layout == "vir" else _hf_usage(run)
    if layout == "hf":
        lines.append("- " + _PAD_NOTE[aspect_ratio])
        lines.append(f"- The chat template is the one the model was trained with (`{run_config.data.template}`, "
                     "the image before the question). `processor.apply_chat_template(..., tokenize=True)` and "
                     "rendering first, then `processor(images=..., text=...)`, give the same ids: the tokenizer adds "
                     "a bos only where the template does not write one.")
        lines.append("- " + checked_with_note(text_model_type))
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


# The versions `make interop-check` loads a `--format llava` export with (scripts/interop/venvs.sh).
LLAVA_CHECKED_WITH = "LLaVA's package `llava-torch` 1.2.2.post1 (transformers 4.36.2, tokenizers 0.15.0, torch 2.0.1)"


def llava_usage(name: str, run: Path, vision_tower: str) -> list:
    """How to load and prompt a `--format llava` export with haotian-liu/LLaVA's own code so that it sees the ids,
    pixels and weights `vir` trained on."""
    model_name = name if "llava" in name.lower() else f"llava-{name}"
    tower_line = ("mm_vision_tower=os.path.join(path, 'vision_tower'))  # see below"
                  if vision_tower == "vision_tower" else ")")
    return [
        f"# {name} (LLaVA's original layout, exported by vir)",
        "",
        f"`{run}` in haotian-liu/LLaVA's own `llava_llama` layout: full weights (LoRA merged), `mm_projector.bin`,",
        "the CLIP tower in `vision_tower/`, the tokenizer with the chat template it was trained with, and",
        "`vir_config.yaml` (`vir-chat` and `vir-eval` load it too).",
        "",
        f"Checked with {LLAVA_CHECKED_WITH}; transformers 4.36.2 is the oldest it was checked with. The code below",
        "gives that code the ids, pixels and weights of training (`make interop-check` in vir's repository).",
        "",
        "```python",
        "import os",
        "import torch",
        "from PIL import Image",
        "from llava.constants import IMAGE_TOKEN_INDEX",
        "from llava.mm_utils import process_images",
        "from llava.model.builder import load_pretrained_model",
        "",
        "path = 'PATH'  # this directory, wherever it now is",
        f"tokenizer, model, image_processor, _ = load_pretrained_model(path, None, '{model_name}',",
        f"                                                             {tower_line}",
        "image = Image.open('photo.png')",
        "if 'A' in image.getbands() or image.mode == 'P':  # as vir does: transparent pixels on white",
        "    image = Image.alpha_composite(Image.new('RGBA', image.size, 'white'), image.convert('RGBA'))",
        "image = image.convert('RGB')",
        "pixels = process_images([image], image_processor, model.config).to(model.device, model.dtype)",
        "messages = [{'role': 'user', 'content': '<image>\\nWhat is in the picture?'}]",
        "prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)",
        "ids = tokenizer(prompt).input_ids  # training's ids (see below)",
        "image_token = tokenizer.convert_tokens_to_ids('<image>')  # -> LLaVA's placeholder, one per image",
        "input_ids = torch.tensor([[IMAGE_TOKEN_INDEX if i == image_token else i for i in ids]])",
        "output = model.generate(input_ids.to(model.device), images=pixels, image_sizes=[image.size],",
        "                        do_sample=False, max_new_tokens=64)",
        "print(tokenizer.decode(output[0], skip_special_tokens=True))",
        "```",
        "",
        "- LLaVA's loader picks its class by the model name: keep `llava` in it (and `mistral` for a Mistral model).",
        "- " + ("`mm_vision_tower` in `config.json` is `vision_tower`, relative to this directory. LLaVA's loader "
                "resolves a relative path against the working directory, so pass the tower's full path as above "
                "(`load_pretrained_model` hands it to the config), or load from inside this directory."
                if vision_tower == "vision_tower" else
                f"`mm_vision_tower` is `{vision_tower}`, the hub checkpoint this model's (frozen) tower is; "
                "`vision_tower/` holds the same weights for loaders that take a path."),
        "- The prompt: LLaVA 1.2.2 has no conversation template for most model families (none for Llama-3), so "
        "use the tokenizer's chat template: it writes what training wrote, `<image>\\n` before the question, and "
        "the tokenizer adds a bos only where the template writes none, so tokenizing the rendered text gives "
        "training's ids, one `<image>` token per image. Do not build them with LLaVA's `tokenizer_image_token`: it "
        "tokenizes the text between `<image>` tags piece by piece, so a SentencePiece tokenizer (Vicuna, Mistral) "
        "puts an extra `▁` after every image; and it keeps the first piece's bos and drops the first token of every "
        "later piece, so with a tokenizer that adds no bos a prompt that writes one loses the newline after "
        "`<image>`.",
        "- Images: vir composites transparent images (RGBA, LA, P with transparency) on white; LLaVA's "
        "`process_images` and its scripts' `convert('RGB')` drop the alpha channel, which shows what lies under "
        "transparent pixels. Composite them as above to give the model the pixels it was trained on. Padding to a "
        "square (`image_aspect_ratio`: pad) is the same in both.",
        "- LLaVA's loader casts the weights to float16 (they are stored in the run's dtype).",
    ]


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _scores(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("accuracy", "blind_accuracy", "per_type", "n") if k in metrics}
