"""The README's user path, end to end, on tiny models saved in the real formats.

The README's own `vir-validate` and stage-1 -> stage-2 `vir-train` commands (read from README.md by
tests/readme_commands.py) run as console scripts in subprocesses, exactly as typed, with only their placeholder
paths moved under a temporary root and a tiny step budget appended. The "checkpoints" are what a user
downloads, shrunk: an HF Llama directory (`LlamaForCausalLM.save_pretrained` + a Llama-3-style tokenizer with
its chat template) and an HF CLIP directory (a full `CLIPModel` at 336 px / patch 14, so 576 image tokens, with
OpenAI's own `preprocessor_config.json` layout). The data is LLaVA-format: captions for stage 1, an
instruction set with images in nested folders (odd sizes, JPEG / PNG, greyscale, RGBA, palette), text-only,
multi-turn and multi-image records, and a JSONL test file with `question_type` and `answer` per record.
Then `vir-eval` and `vir-chat` use the stage-2 run directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List

import pytest
import torch
import yaml
from PIL import Image
from readme_commands import Command, command_for, inline_commands, localize, localized_args, readme_commands

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
NUM_IMAGE_TOKENS = (336 // 14) ** 2  # 576
# The only additions to the README's commands: a 3-step budget, and no TensorBoard writer.
TINY_BUDGET = ["training.max_steps=3", "training.per_device_train_batch_size=2", "training.save_steps=3",
               "training.logging_steps=1", "training.report_to=[]"]
TIMEOUT = 600

# Relative to data.image_folder, LLaVA-style nested folders: (path, size, PIL mode).
IMAGES = [
    ("coco/train2017/000000000001.jpg", (61, 47), "RGB"),
    ("coco/train2017/000000000002.jpg", (403, 219), "RGB"),
    ("ocr_vqa/images/a/b/0001.png", (97, 333), "RGBA"),
    ("gqa/images/n123.jpg", (640, 17), "L"),
    ("textvqa/train_images/abc.png", (33, 35), "P"),
    ("vg/VG_100K_2/1.png", (128, 96), "RGB"),
]
CAPTIONS = ["a red bowl of fruit on a wooden table", "two dogs running on the beach at sunset",
            "the cover of a book with a blue title", "a long thin panorama of a city street",
            "a small green icon on a white background", "a cat sitting on a mat next to a dog"]
QUESTIONS = [("What is on the table?", "A bowl of fruit."), ("How many dogs are there?", "Two."),
             ("What colour is the title?", "Blue."), ("Is it day or night?", "Day."),
             ("What shape is the icon?", "A circle."), ("What is the cat doing?", "Sitting.")]
TEST_TYPES = ["color", "count", "ocr"]


def _human(value):
    return {"from": "human", "value": value}


def _gpt(value):
    return {"from": "gpt", "value": value}


def write_images(folder: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    for rel, (w, h), mode in IMAGES:
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8).numpy()
        image = Image.fromarray(pixels, "RGB")
        image = image.convert("P", palette=Image.Palette.ADAPTIVE) if mode == "P" else image.convert(mode)
        image.save(path)


def caption_records() -> List[dict]:
    """LLaVA's blip_laion_cc_sbu_558k layout: `<image>` alone or with an instruction, then the caption."""
    records = []
    for i, ((rel, _, _), caption) in enumerate(zip(IMAGES, CAPTIONS)):
        prompt = "<image>" if i % 2 == 0 else "Give a brief description of the image.\n<image>"
        records.append({"id": f"cap{i:03d}", "image": rel, "conversations": [_human(prompt), _gpt(caption)]})
    return records


def instruction_records() -> List[dict]:
    """LLaVA's llava_v1_5_mix665k layout: single-turn, multi-turn, text-only and multi-image records."""
    records = []
    for i, ((rel, _, _), (question, answer)) in enumerate(zip(IMAGES, QUESTIONS)):
        records.append({"id": f"{i:06d}", "image": rel,
                        "conversations": [_human(f"<image>\n{question}"), _gpt(answer)]})
    records.append({"id": "multiturn", "image": IMAGES[0][0], "conversations": [
        _human("<image>\nWhat is on the table?"), _gpt("A bowl of fruit."),
        _human("What colour is the bowl?"), _gpt("Red."),
        _human("Is the table made of wood?"), _gpt("Yes, it is wooden."),
    ]})
    records.append({"id": "text_only", "conversations": [
        _human("Write one sentence about a cat."), _gpt("A cat sat on the mat next to a dog.")]})
    records.append({"id": "text_multiturn", "conversations": [
        _human("Hi"), _gpt("Hello."), _human("How many legs does a dog have?"), _gpt("Four.")]})
    records.append({"id": "two_images", "image": [IMAGES[1][0], IMAGES[5][0]], "conversations": [
        _human("<image>\n<image>\nHow many dogs are there in the two images?"), _gpt("Two.")]})
    return records


def eval_records() -> List[dict]:
    """A JSONL test set with `question_type` and `answer` per record (the first four span every type)."""
    rows = []
    for i, (rel, _, _) in enumerate(IMAGES):
        question, answer = QUESTIONS[i]
        rows.append({"id": f"test{i}", "image": rel, "question_type": TEST_TYPES[i % len(TEST_TYPES)],
                     "answer": answer, "conversations": [_human(f"<image>\n{question}"), _gpt(answer)]})
    return rows


def tokenizer_corpus() -> List[str]:
    texts = CAPTIONS + [q for pair in QUESTIONS for q in pair] + ["Give a brief description of the image."]
    return texts * 10


def save_llama(directory: Path) -> None:
    """A Meta-Llama-3-8B-Instruct-shaped directory, tiny: `LlamaForCausalLM.save_pretrained` + tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vir.demo.tokenizer import train_llama3_style_tokenizer

    tokenizer = train_llama3_style_tokenizer(tokenizer_corpus(), directory, vocab_size=512)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=4096, vocab_size=len(tokenizer),
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)


# openai/clip-vit-large-patch14-336's preprocessor_config.json as published (old feature-extractor layout,
# integer sizes), so the loader is tested against the file a user really has.
OPENAI_CLIP_336_PREPROCESSOR = {
    "crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3, "size": 336,
}


def save_clip(directory: Path) -> None:
    """A clip-vit-large-patch14-336-shaped directory, tiny: a full `CLIPModel` (text and vision towers)."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=99, max_position_embeddings=77, bos_token_id=97, eos_token_id=98,
                         pad_token_id=1),
        vision_config=dict(image_size=336, patch_size=14, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=16,
    )
    torch.manual_seed(1)
    CLIPModel(config).save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(OPENAI_CLIP_336_PREPROCESSOR, indent=2))


@dataclass
class World:
    root: Path
    validate: Command
    stage1: Command
    stage2: Command
    eval_cmd: Command
    chat_cmd: Command
    test_jsonl: Path
    chat_image: Path

    def args(self, command: Command) -> List[str]:
        return localized_args(command, self.root)

    def path(self, value: str) -> Path:
        return Path(localize(value, self.root))


def run_cli(program: str, args: List[str], cwd: Path) -> subprocess.CompletedProcess:
    """`program args...` as a user types it: the console script next to this Python, in its own process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([str(BIN / program), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)


def _explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    """Every path the README's commands name, made real under a temporary root."""
    root = tmp_path_factory.mktemp("readme_root")
    commands = readme_commands()
    validate = command_for(commands, "vir-validate")
    stage1 = command_for(commands, "vir-train", training="stage1", model="llama3_8b_clip_l336")
    stage2 = command_for(commands, "vir-train", training="stage2_lora", model="llama3_8b_clip_l336")
    inline = inline_commands()
    eval_cmd = next(c for c in inline if c.program == "vir-eval")
    chat_cmd = next(c for c in inline if c.program == "vir-chat")
    o1, o2, ov = stage1.overrides(), stage2.overrides(), validate.overrides()
    for key in ("model.llm.path", "model.vision_tower.path", "data.image_folder"):
        assert o1[key] == o2[key] == ov[key], f"the README's commands disagree on {key}"
    assert ov["data.train_path"] == o2["data.train_path"] != o1["data.train_path"]

    w = World(root, validate, stage1, stage2, eval_cmd, chat_cmd, test_jsonl=Path(), chat_image=Path())
    llm, clip = w.path(o1["model.llm.path"]), w.path(o1["model.vision_tower.path"])
    images = w.path(o1["data.image_folder"])
    for directory in (llm, clip, images):
        directory.mkdir(parents=True)
    save_llama(llm)
    save_clip(clip)
    write_images(images)
    w.path(o1["data.train_path"]).write_text(json.dumps(caption_records(), indent=1))
    w.path(o2["data.train_path"]).write_text(json.dumps(instruction_records(), indent=1))
    w.test_jsonl = root / "data" / "my_test.jsonl"
    w.test_jsonl.write_text("".join(json.dumps(r) + "\n" for r in eval_records()))
    w.chat_image = images / IMAGES[2][0]
    return w


@pytest.fixture(scope="module")
def stage1(world):
    proc = run_cli("vir-train", world.args(world.stage1) + TINY_BUDGET, world.root)
    return proc, world.path(world.stage1.overrides()["training.output_dir"])


@pytest.fixture(scope="module")
def stage2(world, stage1):
    assert stage1[0].returncode == 0, "stage 1 failed:\n" + _explain(stage1[0])
    proc = run_cli("vir-train", world.args(world.stage2) + TINY_BUDGET, world.root)
    return proc, world.path(world.stage2.overrides()["training.output_dir"])


@pytest.fixture(scope="module")
def stage2_run(stage2):
    proc, out = stage2
    assert proc.returncode == 0, "stage 2 failed:\n" + _explain(proc)
    return out


def _projector(path: Path) -> dict:
    return {k: v.float() for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}


# ------------------------------------------------------------------------------------------------------ tests


def test_readme_validate_command_counts_the_stage2_data(world):
    proc = run_cli("vir-validate", world.args(world.validate), world.root)
    assert proc.returncode == 0, _explain(proc)  # every record is valid on purpose
    out = proc.stdout
    n = len(instruction_records())
    assert f"records: {n}  valid: {n}  invalid: 0" in out, out
    assert f"images: ok {len(IMAGES) + 3}  missing 0  corrupt 0  refused 0" in out, out
    assert "samples: text-only 2  single-image 7  multi-image 1" in out, out
    assert "status: OK" in out, out
    dump = world.path(world.validate.overrides()["validate.dump_dir"])
    summary = json.loads((dump / "summary.json").read_text())
    assert summary["records"] == n and summary["invalid"] == []
    rows = [json.loads(line) for line in (dump / "samples.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == [r["id"] for r in instruction_records()]
    # README: lengths are counted after image expansion (576 tokens per image here), all under 2048.
    for row in rows:
        assert NUM_IMAGE_TOKENS * row["num_images"] < len(row["input_ids"]) <= 2048, row["id"]


def test_readme_stage1_command_trains_the_projector(stage1):
    proc, out = stage1
    assert proc.returncode == 0, _explain(proc)
    assert (out / "mm_projector.bin").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["num_image_tokens"] == NUM_IMAGE_TOKENS
    assert not (out / "adapter_model.safetensors").exists()  # stage 1 trains only the projector
    run_cfg = yaml.safe_load((out / "vir_config.yaml").read_text())
    assert run_cfg["training"]["mode"] == "stage1" and run_cfg["data"]["template"] == "plain"
    assert '"steps": 3' in proc.stdout, proc.stdout
    # README: checkpoint-N/ folders also hold the projector and optimizer state (for resuming).
    assert (out / "checkpoint-3" / "mm_projector.bin").is_file() and (out / "checkpoint-3" / "optimizer.pt").is_file()


def test_readme_stage2_command_trains_lora_from_the_stage1_projector(stage2, stage2_run, stage1):
    out = stage2_run
    assert '"steps": 3' in stage2[0].stdout, stage2[0].stdout
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 128
    assert (out / "mm_projector.bin").is_file()
    assert json.loads((out / "config.json").read_text())["num_image_tokens"] == NUM_IMAGE_TOKENS
    run_cfg = yaml.safe_load((out / "vir_config.yaml").read_text())
    assert run_cfg["model"]["pretrained_projector"] == str(stage1[1] / "mm_projector.bin")
    assert run_cfg["training"]["mode"] == "stage2_lora"
    assert run_cfg["model"]["model_max_length"] == 2048


def test_stage2_projector_starts_from_stage1s(stage2_run, stage1):
    """Stage 2's projector (3 steps at lr <= 2e-5) is within a hair of stage 1's, while a fresh init of the
    same shape is as far from stage 1's as two random matrices are: stage 2 started from stage 1's projector.
    It did train (mm_projector_lr), so it is not stage 1's file copied either."""
    first, second = _projector(stage1[1] / "mm_projector.bin"), _projector(stage2_run / "mm_projector.bin")
    assert first.keys() == second.keys() and first
    torch.manual_seed(123)
    fresh = {}
    for key, w1 in first.items():  # nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        fan_in = first[key.replace(".bias", ".weight")].shape[1]
        fresh[key] = torch.empty_like(w1).uniform_(-fan_in ** -0.5, fan_in ** -0.5)

    def distance(a, b):
        return torch.cat([(a[k] - b[k]).flatten() for k in first]).norm().item()

    scale = torch.cat([w.flatten() for w in first.values()]).norm().item()
    moved, far = distance(second, first), distance(fresh, first)
    assert moved < 0.02 * scale, (moved, scale)
    assert moved < 0.02 * far, (moved, far)
    assert any(not torch.equal(first[k], second[k]) for k in first), "the projector did not train in stage 2"


def test_vir_eval_scores_the_stage2_run_per_question_type(world, stage2_run):
    # The README's `vir-eval RUN --data FILE`, on a JSONL test file, with a tiny generation budget.
    args = world.args(world.eval_cmd)
    assert args[0] == str(stage2_run) and "--data" in args
    args[args.index("--data") + 1] = str(world.test_jsonl)
    proc = run_cli("vir-eval", args + ["--limit", "4", "--max-new-tokens", "4"], world.root)
    assert proc.returncode == 0, _explain(proc)
    table = proc.stdout
    assert "blind" in table and "overall" in table, table
    for question_type in TEST_TYPES:
        assert question_type in table, table
    metrics = json.loads((stage2_run / f"metrics_{world.test_jsonl.stem}.json").read_text())
    assert metrics["n"] == 4 and set(metrics["per_type"]) == set(TEST_TYPES)


def test_vir_chat_answers_once(world, stage2_run):
    # The README's `vir-chat RUN --image photo.jpg --prompt "..."`, with one of the fixture's images.
    args = world.args(world.chat_cmd)
    assert args[0] == str(stage2_run) and "--prompt" in args
    args[args.index("--image") + 1] = str(world.chat_image)
    proc = run_cli("vir-chat", args + ["--max-new-tokens", "4"], world.root)
    assert proc.returncode == 0, _explain(proc)
    assert proc.stdout.strip(), _explain(proc)
