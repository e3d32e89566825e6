"""What the page shows about the run beside the chat, read from the run's own files: a header (checkpoint,
config, device), the loss curves (`curves.png`), the sample grids (`samples/*.png`), `metrics.json`'s per-type
table and example questions from the run's test split (its `data.test_path`, else `data.eval_path`).

A `checkpoint-N/` reads these from its run directory; an export directory has none of them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import List, Optional, Tuple

from vir.app.loading import ChatModel
from vir.data.records import read_raw_records
from vir.inference.evaluate import METRICS_FILE
from vir.utils.errors import UserError

CURVES_FILE = "curves.png"
SAMPLES_DIR = "samples"


def run_root(path: Path) -> Path:
    """The run directory that holds the curves and metrics: `path`, or its parent for a `checkpoint-N/`."""
    path = Path(path)
    if re.fullmatch(r"checkpoint-\d+", path.name) and not (path / METRICS_FILE).is_file():
        return path.parent
    return path


def header_markdown(cm: ChatModel) -> str:
    """The page's header: which checkpoint, what it is, where it runs."""
    device = f"{cm.device.type}" + (f":{cm.device.index}" if cm.device.index is not None else "")
    dtype = str(cm.dtype).replace("torch.", "")
    lines = [f"## vir-demo: `{cm.path}`", f"**Device** {device} ({dtype}) · **Context** {cm.context_length} tokens"]
    lines.append(f"**Config** {config_summary(cm)}")
    return "\n\n".join(lines)


def config_summary(cm: ChatModel) -> str:
    if cm.run_config is None:
        text = cm.model.config.get_text_config()
        return (f"transformers LlavaForConditionalGeneration export · LLM {text.num_hidden_layers} layers x "
                f"{text.hidden_size} · chat template from the processor")
    cfg = cm.run_config
    llm, tower = cfg.model.llm, cfg.model.vision_tower
    name = cfg.get("experiment_name") or "-"
    return (f"experiment {name} · mode {cfg.training.mode} · template {cfg.data.template} · LLM "
            f"{llm.num_hidden_layers} layers x {llm.hidden_size} ({llm.path or 'merged'}) · vision "
            f"{tower.image_size}px/{tower.patch_size} ({cm.num_image_tokens} image tokens) · projector "
            f"{cfg.model.projector_type} · images {cfg.data.image_aspect_ratio}")


def curves_image(path: Path) -> Optional[Path]:
    found = run_root(path) / CURVES_FILE
    return found if found.is_file() else None


def sample_grids(path: Path) -> List[Path]:
    """The visualiser's grids, oldest step first (`samples/step-N.png`)."""
    folder = run_root(path) / SAMPLES_DIR
    if not folder.is_dir():
        return []

    def step(p: Path):
        digits = re.findall(r"\d+", p.stem)
        return (int(digits[-1]) if digits else -1, p.name)

    return sorted(folder.glob("*.png"), key=step)


def metrics_table(path: Path) -> Tuple[List[str], List[list]]:
    """(headers, rows) of `metrics.json`: one row per question type and an overall row; empty without it."""
    file = run_root(path) / METRICS_FILE
    if not file.is_file():
        return [], []
    try:
        metrics = json.loads(file.read_text())
        blind = "blind_accuracy" in metrics
        headers = ["type", "n", "accuracy"] + (["blind accuracy"] if blind else [])
        rows = []
        for name, row in metrics.get("per_type", {}).items():
            rows.append([name, row["n"], round(row["accuracy"], 3)]
                        + ([round(row["blind_accuracy"], 3)] if blind else []))
        rows.append(["overall", metrics["n"], round(metrics["accuracy"], 3)]
                    + ([round(metrics["blind_accuracy"], 3)] if blind else []))
    except (ValueError, KeyError, TypeError):
        return ["note"], [[f"{file} cannot be read as vir-eval's metrics"]]
    return headers, rows


def _locate(value: str, path: Path) -> Optional[Path]:
    """A path from the run config: as written (absolute or relative to the working directory), else relative to
    the run directory's ancestors (configs record paths relative to where training ran)."""
    candidate = Path(value)
    if candidate.is_absolute() or candidate.exists():
        return candidate if candidate.exists() else None
    for base in [path, *Path(path).resolve().parents]:
        if (base / candidate).exists():
            return base / candidate
    return None


def example_questions(cm: ChatModel, limit: int = 4) -> List[Tuple[str, str]]:
    """Up to `limit` (image path, question) pairs: single-image, single-question records of the run's test
    split (else its eval split), one per question type first."""
    cfg = cm.run_config
    if cfg is None:
        return []
    data = cfg.data
    split = data.get("test_path") or data.get("eval_path")
    file = _locate(split, cm.path) if split else None
    folder = _locate(data.image_folder, cm.path) if data.get("image_folder") else (file.parent if file else None)
    if file is None or folder is None:
        return []
    tag = cm.image_token
    picked, seen_types, spare = [], set(), []
    try:
        for raw in read_raw_records(file):
            turns = raw.get("conversations") or []
            image = raw.get("image")
            if not isinstance(image, str) or len(turns) != 2 or not (folder / image).is_file():
                continue
            question = str(turns[0].get("value", "")).replace(tag, "").strip()
            pair = (str(folder / image), question)
            kind = raw.get("question_type")
            if kind not in seen_types:
                seen_types.add(kind)
                picked.append(pair)
            else:
                spare.append(pair)
            if len(picked) >= limit or len(picked) + len(spare) > 50 * limit:
                break
    except (UserError, OSError, AttributeError):
        return picked[:limit]
    return (picked + spare)[:limit]
