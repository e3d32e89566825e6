"""What a plain-transformers process computed on an export (`tests/hf_export_driver.py`) against what the run
computes, case by case (a plain function: import it)."""

from __future__ import annotations

from typing import Optional

import torch

from vir.data.conversation import Message
from vir.data.images import open_user_image, preprocess_images
from vir.data.templates import build_generation_prompt
from vir.models.loss import softcap_logits


def assert_export_computes_the_run(model, tokenizer, processor, aspect_ratio: str, template: str, cases: list,
                                   hf: dict, stop_ids: list, softcap: Optional[float] = None) -> None:
    """For each case (`name`, `images`, `question`): the export's prompt ids, both from `apply_chat_template` and
    from rendering first and then calling the processor, are training's; its pixels are ours; its logits are within
    1e-4 (after `softcap`, which transformers' Llava does not apply); its greedy tokens, stopping at `stop_ids`, are
    the run's."""
    config = model.config
    for case in cases:
        images = [open_user_image(p) for p in case["images"]]
        text = "".join("<image>\n" for _ in images) + case["question"]
        ids = build_generation_prompt([Message("user", text)], tokenizer, template, config.image_token_id,
                                      config.num_image_tokens)
        got = hf[case["name"]]
        assert got["input_ids"].tolist() == ids, case["name"]  # the exported chat template renders training's ids
        assert got["two_step_ids"].tolist() == ids, case["name"]  # rendered first, then processor(text=...)
        kwargs = {}
        if images:
            pixels = preprocess_images(images, processor, aspect_ratio)
            assert torch.allclose(got["pixel_values"], pixels, atol=1e-5), case["name"]
            kwargs["pixel_values"] = pixels
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), **kwargs).logits[0]
        assert (logits - softcap_logits(got["logits"], softcap)).abs().max() < 1e-4, case["name"]
        ours = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=stop_ids,
                              pad_token_id=tokenizer.pad_token_id, **kwargs)
        assert ours[0, len(ids):].tolist() == got["generated"].tolist(), case["name"]


def assert_tokenizer_files_read_by_transformers_4(directory) -> None:
    """The tokenizer files of an export in the form transformers 4.x and tokenizers 0.15 read: a class 4.x has,
    added special tokens as `additional_special_tokens`, BPE merges as `"a b"` strings, the chat template inside
    `tokenizer_config.json` (4.x before 4.50 never reads `chat_template.jinja`)."""
    import json
    from pathlib import Path

    directory = Path(directory)
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "<image>" in tokenizer_config["additional_special_tokens"] and "extra_special_tokens" not in tokenizer_config
    assert tokenizer_config["chat_template"] == (directory / "chat_template.jinja").read_text()
    merges = json.loads((directory / "tokenizer.json").read_text())["model"]["merges"]
    assert merges and all(isinstance(merge, str) and len(merge.split(" ")) == 2 for merge in merges)
