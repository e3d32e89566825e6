"""Load an export with plain transformers, with `vir` made unimportable, and record what it computes.

    python hf_export_driver.py EXPORT_DIR CASES.json OUT.pt [EXPORT_DIR CASES.json OUT.pt ...]

CASES.json: [{"name", "images": [paths], "question"}]. For each case: the processor's chat-template prompt ids,
pixel values, the logits of the prompt, and greedy ids (`max_new_tokens` 8). Written with torch.save.
"""

from __future__ import annotations

import json
import sys


class _NoVir:
    def find_spec(self, name, path=None, target=None):
        if name == "vir" or name.startswith("vir."):
            raise ImportError(f"{name}: project code must not be needed to load an export")
        return None


sys.meta_path.insert(0, _NoVir())

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoProcessor, LlavaForConditionalGeneration  # noqa: E402


def main(export_dir: str, cases_file: str, out_file: str) -> None:
    model = LlavaForConditionalGeneration.from_pretrained(export_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(export_dir)
    results = {"processor": type(processor).__name__, "image_processor": type(processor.image_processor).__name__}
    for case in json.loads(open(cases_file).read()):
        content = [{"type": "image", "image": Image.open(p)} for p in case["images"]]
        content.append({"type": "text", "text": case["question"]})
        messages = [{"role": "user", "content": content}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        # The two-step pattern of transformers' Llava examples and lmms-eval: render, then call the processor.
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        images = [part["image"] for part in content if part["type"] == "image"] or None
        two_step = processor(images=images, text=text, return_tensors="pt")["input_ids"][0]
        with torch.no_grad():
            logits = model(**inputs).logits
            generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        results[case["name"]] = {
            "input_ids": inputs["input_ids"][0], "two_step_ids": two_step, "pixel_values": inputs.get("pixel_values"),
            "logits": logits[0],
            "generated": generated[0, inputs["input_ids"].shape[1]:],
            "answer": processor.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip(),
        }
    torch.save(results, out_file)


if __name__ == "__main__":
    arguments = sys.argv[1:]
    for start in range(0, len(arguments), 3):  # several exports in one process: one start-up for all
        main(*arguments[start:start + 3])
