"""`make interop-check`: a `vir` run read by the code people already run, each in its own virtualenv built once
from PyPI (`scripts/interop/venvs.sh`), against what `vir` computes on the same run.

    python scripts/interop/check.py [--run RUN_DIR] [--keep DIR]

The checks, on three images (an odd size, a greyscale one, an RGBA one with transparent pixels), one line each:
- `llava-format`: `vir-export --format llava`, moved elsewhere, loaded by LLaVA 1.2.2's `load_pretrained_model`
  as its README says (the tower's path passed in);
- `llava-format-hub-id`: the same with `--vision-tower-id`, the tower found in a (local, offline) hub cache;
- `llava-original-import`: a checkpoint built and saved by LLaVA's own code, loaded by `vir`
  (`model.llm.path` + `model.vision_tower.path`);
- `hf-format-transformers-4`: the default export read by transformers 4.57.6's `LlavaForConditionalGeneration`.
Each of these passes when the prompt ids and pixels are `vir`'s, the logits are within 1e-4 and the greedy tokens
equal.
- `llava-prompt-families`: each model family's tokenizer, written as `--format llava` writes it (the tests' tiny
  ones: `tests/family_tokenizers.py`), read under LLaVA's transformers 4.36 / tokenizers 0.15: the README's
  prompt gives training's ids, for texts with one image, two, none, and a run of spaces (required of the families
  `--format llava` writes; the others are reported).
Exits 1 when any fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

from vir.data.conversation import Message
from vir.data.images import open_user_image, preprocess_images
from vir.data.templates import build_generation_prompt, generation_stop_ids
from vir.models.builder import build_all
from vir.models.checkpoint import load_run
from vir.utils.config import compose_config

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LLAVA_VENV, TF4_VENV = "llava-1.2.2.post1", "transformers-4.57.6"
LLAVA_IMAGE_INDEX = -200  # llava.constants.IMAGE_TOKEN_INDEX: one placeholder id per image in LLaVA's prompts
QUESTIONS = {"odd": "What colour is the large shape?", "grey": "Describe the picture.",
             "rgba": "How many shapes are there?"}
TOLERANCE = 1e-4


def make_images(folder: Path) -> dict:
    """Noise images: 45x23 RGB, 37x61 greyscale, 40x40 RGBA whose left half is transparent over red."""
    rng = random.Random(0)
    odd = Image.frombytes("RGB", (45, 23), rng.randbytes(45 * 23 * 3))
    grey = Image.frombytes("L", (37, 61), rng.randbytes(37 * 61))
    rgba = Image.frombytes("RGBA", (40, 40), rng.randbytes(40 * 40 * 4))
    rgba.paste((255, 0, 0, 0), (0, 0, 20, 40))
    paths = {}
    for name, image in (("odd", odd), ("grey", grey), ("rgba", rgba)):
        paths[name] = folder / f"{name}.png"
        image.save(paths[name])
    return paths


class Reference:
    """What `vir` computes on a run: prompt ids, pixels, logits and greedy tokens per image."""

    def __init__(self, model, tokenizer, processor, template: str, aspect_ratio: str):
        self.model, self.tokenizer, self.processor = model.eval(), tokenizer, processor
        self.template, self.aspect_ratio = template, aspect_ratio
        self.stop_ids = generation_stop_ids(template, tokenizer, getattr(model, "generation_config", None))
        self._cases: dict = {}

    def case(self, image: Path, question: str) -> dict:
        """Computed once per image and question: every check compares against the same outputs."""
        if (image, question) not in self._cases:
            self._cases[image, question] = self._compute(image, question)
        return self._cases[image, question]

    def _compute(self, image: Path, question: str) -> dict:
        config = self.model.config
        ids = build_generation_prompt([Message("user", "<image>\n" + question)], self.tokenizer, self.template,
                                      config.image_token_id, config.num_image_tokens)
        pixels = preprocess_images([open_user_image(image)], self.processor, self.aspect_ratio)
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0]
            out = self.model.generate(input_ids=torch.tensor([ids]), pixel_values=pixels, max_new_tokens=8,
                                      do_sample=False, eos_token_id=self.stop_ids,
                                      pad_token_id=self.tokenizer.pad_token_id)
        return {"input_ids": ids, "pixel_values": pixels, "logits": logits, "generated": out[0, len(ids):].tolist()}


def compare(reference: Reference, images: dict, got: dict, id_keys=("input_ids",)) -> tuple:
    """(passed, detail) of another stack's outputs (`got[name]`) against `vir`'s on each image."""
    config = reference.model.config
    worst, problems = 0.0, []
    for name, path in images.items():
        ours, theirs = reference.case(path, QUESTIONS[name]), got[name]
        for key in id_keys:
            ids = []
            for token in theirs[key].tolist():  # LLaVA's one placeholder per image -> the image's positions
                ids += [config.image_token_id] * config.num_image_tokens if token == LLAVA_IMAGE_INDEX else [token]
            if ids != ours["input_ids"]:
                problems.append(f"{name}: {key} differ")
        if not torch.allclose(theirs["pixel_values"].reshape(ours["pixel_values"].shape), ours["pixel_values"],
                              atol=1e-5):
            problems.append(f"{name}: pixels differ")
        vocab = min(ours["logits"].shape[-1], theirs["logits"].shape[-1])
        if ours["logits"].shape[0] != theirs["logits"].shape[0]:
            problems.append(f"{name}: {theirs['logits'].shape[0]} logit rows, ours {ours['logits'].shape[0]}")
        else:
            diff = float((ours["logits"][:, :vocab] - theirs["logits"][:, :vocab].float()).abs().max())
            worst = max(worst, diff)
            if diff > TOLERANCE:
                problems.append(f"{name}: max |dlogit| {diff:.2e}")
        if theirs["generated"].tolist() != ours["generated"]:
            problems.append(f"{name}: greedy {theirs['generated'].tolist()} != ours {ours['generated']}")
    detail = f"{len(images)} images, max |dlogit| {worst:.1e}" + ("; " + "; ".join(problems) if problems else
                                                                   ", ids, pixels and greedy tokens equal")
    return not problems, detail


def venv_python(home: Path, name: str) -> str:
    return str(home / name / "bin" / "python")


def run(command: list, env: dict | None = None, cwd: Path | None = None) -> None:
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(map(str, command[:4]))} ... exited {done.returncode}:\n{tail}")


def export(run_dir: Path, out: Path, *flags: str) -> Path:
    run([sys.executable, "-m", "vir.cli.export", str(run_dir), str(out), *flags])
    return out


def hub_cache(root: Path, repo_id: str, files: Path) -> Path:
    """A hub cache (HF_HOME) holding `files` as `repo_id`'s main revision, for offline loading by id."""
    snapshot = root / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / ("0" * 40)
    shutil.copytree(files, snapshot)
    (snapshot.parents[1] / "refs").mkdir(parents=True)
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    return root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "local_debug",
                        help="a finished Llama-3 + CLIP run (default: make train's)")
    parser.add_argument("--keep", type=Path, default=None, help="write the exports and outputs here and keep them")
    args = parser.parse_args(argv)
    home = Path(subprocess.run(["sh", str(HERE / "venvs.sh")], check=True, capture_output=True,
                               text=True).stdout.strip().splitlines()[-1])
    work = args.keep or Path(tempfile.mkdtemp(prefix="vir-interop-"))
    work.mkdir(parents=True, exist_ok=True)
    images = make_images(work)
    model, tokenizer, processor, run_config = load_run(args.run, device="cpu")
    reference = Reference(model, tokenizer, processor, run_config.data.template, run_config.data.image_aspect_ratio)
    spec = {"stop_ids": reference.stop_ids,
            "cases": [{"name": n, "image": str(p), "question": QUESTIONS[n]} for n, p in images.items()]}
    (work / "cases.json").write_text(json.dumps(spec))
    # transformers 4.x's LlavaImageProcessor drops alpha (5.x composites on white, as vir does): the export's
    # README says to composite first, and so the check does.
    white = images["rgba"].with_name("rgba_on_white.png")
    Image.alpha_composite(Image.new("RGBA", (40, 40), "white"), Image.open(images["rgba"])).convert("RGB").save(white)
    hf_images = {**images, "rgba": white}
    (work / "hf_cases.json").write_text(json.dumps([{"name": n, "images": [str(p)], "question": QUESTIONS[n]}
                                                    for n, p in hf_images.items()]))
    llava_python = venv_python(home, LLAVA_VENV)
    driver = str(HERE / "llava_driver.py")
    results = {}

    def check(name: str, body) -> None:
        try:
            passed, detail = body()
        except Exception as err:  # one line per check, whatever went wrong
            passed, detail = False, f"{type(err).__name__}: {err}"
        results[name] = passed
        print(f"{'PASS' if passed else 'FAIL'} {name}: {detail}", flush=True)

    def llava_format() -> tuple:
        made = export(args.run, work / "exported" / "llava-demo", "--format", "llava")
        moved = work / "moved" / "llava-demo"
        moved.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(made), moved)
        run([llava_python, driver, "load", str(moved), str(work / "cases.json"), str(work / "llava.pt"),
             "--tower-kwarg"])
        return loaded_by_llava(work / "llava.pt")

    def llava_hub_id() -> tuple:
        tower_id = "openai/vir-interop-tiny-clip"
        made = export(args.run, work / "llava-hub-id", "--format", "llava", "--vision-tower-id", tower_id)
        env = {**os.environ, "HF_HOME": str(hub_cache(work / "hf_home", tower_id, made / "vision_tower")),
               "HF_HUB_OFFLINE": "1"}
        moved = work / "moved" / "llava-hub-id"
        moved.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(made), moved)
        run([llava_python, driver, "load", str(moved), str(work / "cases.json"), str(work / "llava_id.pt")], env=env)
        return loaded_by_llava(work / "llava_id.pt")

    def loaded_by_llava(path: Path) -> tuple:
        got = torch.load(path, weights_only=False)
        weights = got["weights"]
        if weights["missing"] or weights["different"]:
            return False, f"float16 load: missing {weights['missing']}, different {weights['different']}"
        passed, detail = compare(reference, images, got)
        raw = got["rgba"]["raw_pixel_difference"]  # the RGBA image as LLaVA's scripts read it: alpha dropped
        return passed, (f"{weights['checked']} tensors loaded as stored; {detail} (RGBA composited on white as the "
                        f"README says; with alpha dropped, as LLaVA's scripts do, pixels differ by up to {raw:.2f})")

    def llava_original() -> tuple:
        source = work / "moved" / "llava-demo"
        original = work / "llava-original"
        run([llava_python, driver, "build", str(original), str(source / "vision_tower"), str(source),
             str(work / "cases.json"), str(work / "original.pt")])
        cfg = compose_config(["model.llm.path=" + str(original), "model.vision_tower.path=" +
                              str(source / "vision_tower"), f"data.template={run_config.data.template}",
                              f"data.image_aspect_ratio={run_config.data.image_aspect_ratio}",
                              "model.llm.dtype=float32"])
        ours, our_tokenizer, our_processor = build_all(cfg)
        imported = Reference(ours, our_tokenizer, our_processor, run_config.data.template,
                             run_config.data.image_aspect_ratio)
        imported.stop_ids = reference.stop_ids
        return compare(imported, images, torch.load(work / "original.pt", weights_only=False))

    def hf_transformers_4() -> tuple:
        made = export(args.run, work / "hf")
        run([venv_python(home, TF4_VENV), str(REPO / "tests" / "hf_export_driver.py"), str(made),
             str(work / "hf_cases.json"), str(work / "hf4.pt")])
        got = torch.load(work / "hf4.pt", weights_only=False)
        return compare(reference, images, got, id_keys=("input_ids", "two_step_ids"))

    check("llava-format", llava_format)
    check("llava-format-hub-id", llava_hub_id)
    check("llava-original-import", llava_original)
    check("hf-format-transformers-4", hf_transformers_4)
    check("llava-prompt-families", lambda: prompt_families(llava_python, driver, work))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    failed = [name for name, passed in results.items() if not passed]
    print(f"interop-check: {len(results) - len(failed)}/{len(results)} passed" +
          (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


PROMPT_TEXTS = ("<image>\nWhat colour?", "<image>\n<image>\nDescribe the pictures.", "No image here.",
                "<image>\nIs it  left of the cat?")


def prompt_families(llava_python: str, driver: str, work: Path) -> tuple:
    """The README's prompt under LLaVA's stack, per family (see module doc)."""
    sys.path.insert(0, str(REPO / "tests"))
    from family_tokenizers import FAMILIES, FAMILY_TEMPLATES, family_tokenizer

    from vir.export.chat_template import chat_template_for, drop_implicit_bos
    from vir.export.portable import write_portable_tokenizer
    from vir.models.builder import prepare_tokenizer

    folder, expected = work / "family_tokenizers", {}
    for family in FAMILIES:
        tokenizer = prepare_tokenizer(family_tokenizer(family, work / "family_sources" / family))
        template = FAMILY_TEMPLATES[family]
        image_id = tokenizer.convert_tokens_to_ids("<image>")
        tokenizer.chat_template = chat_template_for(template, tokenizer)
        drop_implicit_bos(tokenizer, template, image_id, 1, tokenizer.chat_template)
        tokenizer.save_pretrained(str(folder / family))
        write_portable_tokenizer(folder / family)
        expected[family] = {text: [LLAVA_IMAGE_INDEX if i == image_id else i for i in
                                   build_generation_prompt([Message("user", text)], tokenizer, template, image_id, 1)]
                            for text in PROMPT_TEXTS}
    (work / "texts.json").write_text(json.dumps(PROMPT_TEXTS))
    run([llava_python, driver, "prompts", str(folder), str(work / "texts.json"), str(work / "prompts.json")])
    got = json.loads((work / "prompts.json").read_text())
    verdicts = {family: "equal" if got[family] == expected[family] else
                (got[family] if isinstance(got[family], str) else
                 f"{sum(got[family][t] != expected[family][t] for t in PROMPT_TEXTS)}/{len(PROMPT_TEXTS)} differ")
                for family in FAMILIES}
    passed = all(verdicts[f] == "equal" for f in LLAVA_FAMILIES)
    return passed, ", ".join(f"{f} {v}" for f, v in verdicts.items()) + \
        f" (must be equal: {', '.join(LLAVA_FAMILIES)}, the families --format llava writes)"


LLAVA_FAMILIES = ("llama3", "vicuna", "mistral")


if __name__ == "__main__":
    sys.exit(main())
