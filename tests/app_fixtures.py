"""Helpers for the vir-demo tests (plain functions: import them): a tiny trained run and vir-eval's own answer
for one of its eval records, the reference the page and the chat engine must reproduce."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from training_fixtures import lora_run, tiny_bases

MAX_NEW_TOKENS = 8


@dataclass(frozen=True)
class Reference:
    run_dir: Path
    image: Path
    question: str
    answer: str  # vir-eval's prediction


def eval_reference(factory) -> Reference:
    """vir-eval (the console script's main) on a copy of the tiny LoRA run given the synthetic test split
    (`data.test_path`), up to its first single-image, single-question record: the page's upload + question is
    exactly that record."""
    from vir.cli import eval as eval_cli

    run = factory.mktemp("demo_run") / "run"
    shutil.copytree(lora_run(factory).output_dir, run, ignore=shutil.ignore_patterns("checkpoint-*"))
    cfg = OmegaConf.load(run / "vir_config.yaml")
    cfg.data.test_path = str(tiny_bases(factory).data.test)  # the fixture's run was trained without one
    OmegaConf.save(cfg, run / "vir_config.yaml")
    records = json.loads(Path(cfg.data.test_path).read_text())
    index = next(k for k, r in enumerate(records) if isinstance(r.get("image"), str) and len(r["conversations"]) == 2)
    record = records[index]
    eval_cli.main([str(run), "--split", "test", "--limit", str(index + 1), "--no-blind",
                   "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", "1"])
    rows = [json.loads(line) for line in (run / "predictions_test.jsonl").read_text().splitlines()]
    prediction = next(row["prediction"] for row in rows if row["id"] == record["id"])
    question = record["conversations"][0]["value"].replace("<image>", "").strip()
    return Reference(run, Path(cfg.data.image_folder) / record["image"], question, prediction)


def converted(tool: str, run_dir: Path, out: Path) -> Path:
    """`out` after `vir-merge` or `vir-export` (the console scripts' modules) turned `run_dir` into it."""
    module = {"vir-merge": "vir.cli.merge", "vir-export": "vir.cli.export"}[tool]
    done = subprocess.run([sys.executable, "-m", module, str(run_dir), str(out)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out
