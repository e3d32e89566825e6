"""Exact-match VQA evaluation with a per-question-type breakdown and a blind (images blanked) baseline."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from vir.data.conversation import DEFAULT_IMAGE_TOKEN, normalize_record
from vir.data.images import black_image, load_image, processor_image_size
from vir.data.records import read_raw_records
from vir.inference.generate import Query, generate_answers
from vir.inference.scoring import accuracy_by_type, exact_match, overall_accuracy

logger = logging.getLogger(__name__)

UNTYPED = "all"


@dataclass
class EvalItem:
    """One scored question: the prompt turns before the reference answer, the images and the reference."""

    id: str
    query: Query
    reference: str
    question_type: str
    image_paths: List[str] = field(default_factory=list)


@dataclass
class EvalResult:
    accuracy: float
    n: int
    per_type: Dict[str, Dict[str, float]]
    predictions: List[dict]

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "n": self.n, "per_type": self.per_type}


def load_eval_items(data_path: str | Path, image_folder: Optional[str | Path] = None,
                    image_token: str = DEFAULT_IMAGE_TOKEN, min_side: Optional[int] = None) -> List[EvalItem]:
    """Items from a LLaVA-format file (JSON list or JSONL, read as training reads it): each record's last
    assistant turn is the reference, the turns before it the prompt. `answer` / `question_type` record keys are
    used when present. `image_token` is the run's `model.image_token`; `min_side` (the model's input side)
    reduces large images as training does (`vir.data.images.decoded_rgb`)."""
    path = Path(data_path)
    folder = Path(image_folder) if image_folder else path.parent
    items = []
    for index, raw in enumerate(read_raw_records(path)):
        record = normalize_record(raw, index, image_token)
        last = max(k for k, m in enumerate(record.messages) if m.role == "assistant")
        images = []
        for image_path in record.images:
            image, status = load_image(image_path, folder, min_side)
            if image is None:
                raise FileNotFoundError(f"evaluation record {record.id!r}: image {image_path} is {status}")
            images.append(image)
        reference = raw.get("answer", record.messages[last].content)
        items.append(EvalItem(record.id, Query(list(record.messages[:last]), images), reference,
                              raw.get("question_type", UNTYPED), list(record.images)))
    return items


def blank(items: Sequence[EvalItem]) -> List[EvalItem]:
    """The same items with every image replaced by a black image of the same size (the blind baseline)."""
    return [EvalItem(i.id, Query(i.query.messages, [black_image(im.size) for im in i.query.images]),
                     i.reference, i.question_type, i.image_paths) for i in items]


def score(items: Sequence[EvalItem], predictions: Sequence[str]) -> EvalResult:
    """Exact match (normalised) overall and per question type."""
    per_type = accuracy_by_type(predictions, [i.reference for i in items], [i.question_type for i in items])
    rows = [{"id": item.id, "type": item.question_type, "prediction": prediction, "reference": item.reference,
             "correct": exact_match(prediction, item.reference)} for item, prediction in zip(items, predictions)]
    return EvalResult(overall_accuracy(per_type), len(rows), per_type, rows)


def evaluate(model, tokenizer, image_processor, items: Sequence[EvalItem], *, template: str = "llama3",
             image_aspect_ratio: str = "pad", system_prompt: Optional[str] = None, max_new_tokens: int = 24,
             batch_size: int = 32, progress: bool = True) -> EvalResult:
    """Generate greedily for every item and score exact match."""
    predictions = generate_answers(model, tokenizer, image_processor, [i.query for i in items],
                                   template=template, image_aspect_ratio=image_aspect_ratio,
                                   system_prompt=system_prompt, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, progress=progress)
    return score(items, predictions)


def evaluate_with_blind(model, tokenizer, image_processor, items: Sequence[EvalItem], **kwargs) -> dict:
    """`metrics.json` content: accuracy with images and with images blanked, overall and per type."""
    seen = evaluate(model, tokenizer, image_processor, items, **kwargs)
    blind = evaluate(model, tokenizer, image_processor, blank(items), **kwargs)
    per_type = {
        t: {"accuracy": v["accuracy"], "blind_accuracy": blind.per_type[t]["accuracy"], "n": v["n"]}
        for t, v in seen.per_type.items()
    }
    return {"accuracy": seen.accuracy, "blind_accuracy": blind.accuracy, "n": seen.n, "per_type": per_type,
            "predictions": seen.predictions}


METRICS_FILE = "metrics.json"  # the run's headline figures: the test split, as `make train` writes them
_TRAINING_KEYS = ("stages", "data_stats")  # what a training run adds to metrics.json beside the scores


def evaluate_run(run_dir, split: str = "test", data_path: Optional[str] = None, limit: Optional[int] = None,
                 blind: bool = True, max_new_tokens: int = 16, batch_size: int = 64,
                 write: bool = True, training: Optional[dict] = None) -> dict:
    """Load a run directory (`vir.models.checkpoint.load_run`), score `split` of its data (or `data_path`),
    with the blind baseline beside it; unless `write=False`, writes `<run_dir>/<metrics_file(...)>` and
    `predictions_<split>.jsonl`. Rewriting the test split's `metrics.json` keeps what training put there (the
    stages' losses, the data-pipeline counters), or takes them from `training` (keys `stages`, `data_stats`);
    another split never overwrites it."""
    from vir.models.checkpoint import load_run

    model, tokenizer, image_processor, run_cfg = load_run(run_dir)
    path = data_path or run_cfg.data.get(f"{split}_path")
    if not path:
        raise ValueError(f"{run_dir}: its config has no data.{split}_path; pass a data file explicitly")
    items = load_eval_items(path, run_cfg.data.image_folder, run_cfg.model.image_token,
                            min(processor_image_size(image_processor)))[:limit]
    kwargs = dict(template=run_cfg.data.template, image_aspect_ratio=run_cfg.data.image_aspect_ratio,
                  system_prompt=run_cfg.data.system_prompt, max_new_tokens=max_new_tokens, batch_size=batch_size)
    if blind:
        metrics = evaluate_with_blind(model, tokenizer, image_processor, items, **kwargs)
    else:
        result = evaluate(model, tokenizer, image_processor, items, **kwargs)
        metrics = {**result.to_dict(), "predictions": result.predictions}
    metrics.update({"split": split, "data_path": str(path)})
    if write:
        out = Path(run_dir)
        (out / f"predictions_{split}.jsonl").write_text(
            "".join(json.dumps(row) + "\n" for row in metrics["predictions"]))
        summary = {k: v for k, v in metrics.items() if k != "predictions"}
        target = out / metrics_file(split, data_path)
        if target.name == METRICS_FILE and target.is_file():
            try:
                kept = json.loads(target.read_text())
            except ValueError:
                kept = {}
            summary = {**{k: kept[k] for k in _TRAINING_KEYS if k in kept}, **summary}
        if training and target.name == METRICS_FILE:
            summary.update({k: training[k] for k in _TRAINING_KEYS if k in training})
        target.write_text(json.dumps(summary, indent=2))
        return summary
    return {k: v for k, v in metrics.items() if k != "predictions"}


def metrics_file(split: str, data_path: Optional[str] = None) -> str:
    """Where `evaluate_run` writes a split's figures: `metrics.json` for the run's own test split, else
    `metrics_<split>.json` (`metrics_<file stem>.json` for another data file)."""
    if data_path is not None:
        return f"metrics_{Path(data_path).stem}.json"
    return METRICS_FILE if split == "test" else f"metrics_{split}.json"


def format_metrics(metrics: dict) -> str:
    """A small table: overall and per-type accuracy beside the blind baseline."""
    blind = "blind_accuracy" in metrics
    lines = [f"{'type':<12}{'n':>6}{'accuracy':>10}" + (f"{'blind':>8}" if blind else "")]
    for name, row in metrics["per_type"].items():
        lines.append(f"{name:<12}{row['n']:>6}{row['accuracy']:>10.3f}"
                     + (f"{row['blind_accuracy']:>8.3f}" if blind else ""))
    lines.append(f"{'overall':<12}{metrics['n']:>6}{metrics['accuracy']:>10.3f}"
                 + (f"{metrics['blind_accuracy']:>8.3f}" if blind else ""))
    return "\n".join(lines)
