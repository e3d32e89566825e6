"""haotian-liu/LLaVA's own code (`llava-torch` 1.2.2.post1, in its own virtualenv) on a `vir` export, and an
original LLaVA checkpoint built by that code; `vir` is unimportable here. Run by `scripts/interop/check.py`.

    python llava_driver.py load EXPORT_DIR CASES.json OUT.pt [--tower-kwarg]
    python llava_driver.py build OUT_DIR TOWER_DIR TOKENIZER_DIR CASES.json OUT.pt
    python llava_driver.py prompts TOKENIZERS_DIR TEXTS.json OUT.json

CASES.json: {"stop_ids": [...], "cases": [{"name", "image", "question"}]}. For each case this records what LLaVA's
code computes, prompted as the export's README says: the chat template's ids, the pixels of
`process_images`, the prompt's logits and the greedy tokens (8 at most). Written with torch.save.

`load` runs `load_pretrained_model` as a user would (from another working directory; with `--tower-kwarg` it
passes `mm_vision_tower=EXPORT_DIR/vision_tower`, else the config's own reference must resolve). LLaVA's loader
casts to float16, whose CPU kernels torch 2.0 lacks and whose rounding would hide a 1e-4 comparison: so it checks
that every float16 tensor loaded is the export's tensor rounded, then computes with LLaVA's same classes loaded
in float32 (`from_pretrained` with the same arguments, tower by `load_model`).
`prompts` reads each tokenizer under TOKENIZERS_DIR (one folder per model family, written as an export writes
it) as LLaVA's loader does and records the README's prompt ids for each text of TEXTS.json (a list), or the error.
`build` makes a tiny checkpoint the way LLaVA's `train.py` does (`initialize_vision_modules`, the `mm_*` config
fields, `save_pretrained`) from the tower and tokenizer given, and records its outputs.
"""

from __future__ import annotations

import json
import os
import sys


class _NoVir:
    def find_spec(self, name, path=None, target=None):
        if name == "vir" or name.startswith("vir."):
            raise ImportError(f"{name}: project code must not be needed here")
        return None


sys.meta_path.insert(0, _NoVir())

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from llava.constants import IMAGE_TOKEN_INDEX  # noqa: E402
from llava.mm_utils import process_images  # noqa: E402
from llava.model import LlavaLlamaForCausalLM  # noqa: E402
from llava.model.builder import load_pretrained_model  # noqa: E402


def readme_image(path: str) -> Image.Image:
    """The image as the export's README prepares it: transparency on white, then RGB."""
    image = Image.open(path)
    if "A" in image.getbands() or image.mode == "P":
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    return image.convert("RGB")


def readme_ids(tokenizer, text: str) -> torch.Tensor:
    """The prompt as the export's README builds it: the chat template's ids, the image token made LLaVA's."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt).input_ids
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    return torch.tensor([[IMAGE_TOKEN_INDEX if i == image_token else i for i in ids]])


def run_cases(model, tokenizer, image_processor, spec: dict) -> dict:
    results = {}
    for case in spec["cases"]:
        image = readme_image(case["image"])
        pixels = process_images([image], image_processor, model.config).to(torch.float32)
        ids = readme_ids(tokenizer, "<image>\n" + case["question"])
        with torch.no_grad():
            logits = model(input_ids=ids, images=pixels, image_sizes=[image.size]).logits[0]
            generated = model.generate(ids, images=pixels, image_sizes=[image.size], do_sample=False,
                                       max_new_tokens=8, eos_token_id=spec["stop_ids"],
                                       pad_token_id=tokenizer.pad_token_id)
        generated = generated[0]
        if generated[:1].tolist() == [tokenizer.bos_token_id]:  # transformers 4.36's generate from embeddings
            generated = generated[1:]  # starts its output with bos (decode(skip_special_tokens=True) drops it)
        raw = Image.open(case["image"]).convert("RGB")  # LLaVA's scripts' own handling, for the record
        raw_pixels = process_images([raw], image_processor, model.config).to(torch.float32)
        results[case["name"]] = {"input_ids": ids[0], "pixel_values": pixels, "logits": logits,
                                 "generated": generated, "answer": tokenizer.decode(generated),
                                 "raw_pixel_difference": float((raw_pixels - pixels).abs().max())}
    return results


def export_tensors(export_dir: str) -> dict:
    tensors = {}
    for name in sorted(os.listdir(export_dir)):
        if name.startswith("model") and name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(export_dir, name)))
    tower = os.path.join(export_dir, "vision_tower")
    tensors.update({"model.vision_tower.vision_tower." + k: v
                    for k, v in load_file(os.path.join(tower, "model.safetensors")).items()})
    return tensors


def check_float16_load(model, export_dir: str) -> dict:
    """Every tensor `load_pretrained_model` loaded against the export's, rounded to float16."""
    stored = export_tensors(export_dir)
    missing, different = [], []
    state = model.state_dict()
    for key, tensor in state.items():
        if key not in stored:
            missing.append(key)
        elif not torch.equal(tensor.cpu(), stored[key].to(tensor.dtype)):
            different.append(key)
    return {"checked": len(state), "missing": missing[:5], "different": different[:5]}


def load(export_dir: str, cases_file: str, out_file: str, tower_kwarg: bool) -> None:
    export_dir = os.path.abspath(export_dir)
    name = "llava-" + os.path.basename(export_dir.rstrip("/"))
    extra = {"mm_vision_tower": os.path.join(export_dir, "vision_tower")} if tower_kwarg else {}
    os.chdir(os.path.dirname(export_dir))  # not the export: a relative reference must not resolve by chance
    tokenizer, model16, image_processor, _ = load_pretrained_model(export_dir, None, name, device="cpu", **extra)
    weights = check_float16_load(model16, export_dir)
    del model16
    model = LlavaLlamaForCausalLM.from_pretrained(export_dir, low_cpu_mem_usage=True, torch_dtype=torch.float32,
                                                  **extra).eval()
    model.get_vision_tower().load_model()
    spec = json.loads(open(cases_file).read())
    results = run_cases(model, tokenizer, image_processor, spec)
    results["weights"] = weights
    results["tokenizer_class"] = type(tokenizer).__name__
    torch.save(results, out_file)


def build(out_dir: str, tower_dir: str, tokenizer_dir: str, cases_file: str, out_file: str) -> None:
    """A tiny checkpoint built and saved by LLaVA's own code, as its `train.py` does it."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer
    from llava.model import LlavaConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlavaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, initializer_range=0.1)
    model = LlavaLlamaForCausalLM(config)
    model_args = SimpleNamespace(vision_tower=tower_dir, mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                                 pretrain_mm_mlp_adapter=None, mm_patch_merge_type="flat",
                                 mm_projector_type="mlp2x_gelu")
    model.get_model().initialize_vision_modules(model_args=model_args)
    model.config.image_aspect_ratio = "pad"
    model.config.tokenizer_padding_side = "right"
    model.config.tokenizer_model_max_length = 2048
    model.config.mm_use_im_start_end = False
    model.config.mm_use_im_patch_token = False
    model.config.tune_mm_mlp_adapter = False
    model.config.freeze_mm_mlp_adapter = False
    model.config.mm_projector_lr = None
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    model.eval()
    image_processor = model.get_vision_tower().image_processor
    results = run_cases(model, tokenizer, image_processor, json.loads(open(cases_file).read()))
    torch.save(results, out_file)


def prompts(tokenizers_dir: str, texts_file: str, out_file: str) -> None:
    from transformers import AutoTokenizer

    texts, results = json.loads(open(texts_file).read()), {}
    for family in sorted(os.listdir(tokenizers_dir)):
        try:
            tokenizer = AutoTokenizer.from_pretrained(os.path.join(tokenizers_dir, family), use_fast=False)
            results[family] = {text: readme_ids(tokenizer, text)[0].tolist() for text in texts}
        except Exception as err:  # recorded: the check reports it
            results[family] = f"{type(err).__name__}: {err}"
    open(out_file, "w").write(json.dumps(results))


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    if command == "load":
        load(*arguments[:3], tower_kwarg="--tower-kwarg" in arguments[3:])
    elif command == "build":
        build(*arguments)
    elif command == "prompts":
        prompts(*arguments)
    else:
        sys.exit(f"unknown command {command!r}: load or build")
