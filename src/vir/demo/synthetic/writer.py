"""Write the synthetic data set to disk (images, LLaVA JSON splits, scene metadata, tokenizer, manifest)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Union

from vir.demo.config import SyntheticConfig
from vir.demo.synthetic.scene import Scene, render_scene
from vir.demo.synthetic.splits import IMAGE_TOKEN, SPLITS, PlannedImage, SplitPlan, plan_splits

logger = logging.getLogger(__name__)

# Bump when the generator's output changes for the same spec, so old data sets are regenerated.
GENERATOR_VERSION = 1
_OWN_IMAGE = re.compile(r"^(stage1|train|eval|test)_\d{6}\.png$")


@dataclass(frozen=True)
class SyntheticPaths:
    """Where `generate` put things; `root` is the `image_folder` the records' "image" paths are relative to."""

    root: Path
    images: Path
    stage1: Path
    train: Path
    eval: Path
    test: Path
    scenes: Path
    tokenizer: Path
    manifest: Path

    @classmethod
    def under(cls, root: Union[str, Path]) -> "SyntheticPaths":
        root = Path(root)
        return cls(
            root=root,
            images=root / "images",
            stage1=root / "stage1.json",
            train=root / "train.json",
            eval=root / "eval.json",
            test=root / "test.json",
            scenes=root / "scenes.jsonl",
            tokenizer=root / "tokenizer",
            manifest=root / "manifest.json",
        )


def as_spec(spec: Any = None) -> SyntheticConfig:
    """A `SyntheticConfig` from itself, None (defaults), a dict or an OmegaConf node (`cfg.demo.synthetic`)."""
    if spec is None:
        return SyntheticConfig()
    if isinstance(spec, SyntheticConfig):
        return spec
    from omegaconf import OmegaConf

    if OmegaConf.is_config(spec):  # a DictConfig is a Mapping too, but holds ListConfig/DictConfig values
        spec = OmegaConf.to_container(spec, resolve=True)
    known = {f.name for f in dataclasses.fields(SyntheticConfig)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"unknown demo.synthetic keys {unknown}; known keys: {sorted(known)}")
    return SyntheticConfig(**{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in spec.items()})


def spec_hash(spec: SyntheticConfig) -> str:
    payload = json.dumps({"generator_version": GENERATOR_VERSION, "spec": asdict(spec)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def generate(root: Union[str, Path], spec: Any = None, force: bool = False) -> SyntheticPaths:
    """Generate the data set under `root`; return at once when `root/manifest.json` matches the spec's hash.

    Writes `images/*.png`, `stage1.json` (captions), `train.json`, `eval.json`, `test.json` (LLaVA JSON,
    image paths relative to `root`), `scenes.jsonl` (objects per image), `tokenizer/` (Llama-3-style BPE
    trained on all the data set's text) and, last, `manifest.json` (spec, hash, counts, broken files), so an
    interrupted run is redone next time.
    """
    spec = as_spec(spec)
    paths = SyntheticPaths.under(root)
    digest = spec_hash(spec)
    if not force and _is_complete(paths, digest):
        logger.info("synthetic data at %s matches the spec (hash %s); not regenerating", paths.root, digest)
        return paths
    start = time.perf_counter()
    paths.manifest.unlink(missing_ok=True)
    paths.images.mkdir(parents=True, exist_ok=True)
    for old in paths.images.iterdir():  # stale images of another spec would pass for valid data
        if _OWN_IMAGE.match(old.name):
            old.unlink()
    plans = plan_splits(spec)
    for plan in plans.values():
        _write_images(paths.root, plan.images, spec.image_size)
        _write_json(getattr(paths, plan.name), plan.records)
    _write_scenes(paths.scenes, plans)
    _train_tokenizer(paths.tokenizer, plans, spec.vocab_size)
    seconds = time.perf_counter() - start
    manifest = _manifest(spec, digest, plans, seconds)
    _write_json(paths.manifest, manifest)
    logger.info("generated synthetic data at %s in %.1fs: %s", paths.root, seconds, manifest["counts"])
    return paths


def corpus_texts(spec: Any = None, splits: Sequence[str] = ("stage1", "train")) -> List[str]:
    """The text of `splits` (captions; each conversation as "question\\nanswer\\n..."), without rendering:
    exactly the text `generate` writes, for text-only pretraining of a tiny LLM."""
    plans = plan_splits(as_spec(spec), splits)
    return [_record_text(record) for split in splits for record in plans[split].records]


def load_scenes(path: Union[str, Path], spec: Any = None) -> Dict[str, Scene]:
    """`scenes.jsonl` -> {record id: Scene}."""
    spec = as_spec(spec)
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return {row["id"]: Scene.from_dict(row, spec) for row in rows}


def _is_complete(paths: SyntheticPaths, digest: str) -> bool:
    try:
        manifest = json.loads(paths.manifest.read_text())
    except (OSError, ValueError):
        return False
    files = (paths.stage1, paths.train, paths.eval, paths.test, paths.scenes, paths.tokenizer / "tokenizer.json")
    return manifest.get("spec_hash") == digest and all(p.is_file() for p in files)


def _write_images(root: Path, images: Iterable[PlannedImage], image_size: int) -> None:
    for image in images:
        target = root / image.path
        if image.broken == "missing":
            continue
        if image.broken == "empty":
            target.write_bytes(b"")
            continue
        buffer = io.BytesIO()
        # compress_level=1: 64-px scenes are mostly flat colour, so it is ~2x faster at nearly the same size.
        render_scene(image.scene, image_size).save(buffer, format="PNG", compress_level=1)
        data = buffer.getvalue()
        target.write_bytes(data[: len(data) // 2] if image.broken == "truncated" else data)


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


def _write_scenes(path: Path, plans: Dict[str, SplitPlan]) -> None:
    with open(path, "w") as f:
        for plan in plans.values():
            for image in plan.images:
                row = {"id": image.record_id, "split": plan.name, "image": image.path, **image.scene.to_dict()}
                if image.broken:
                    row["broken"] = image.broken
                f.write(json.dumps(row) + "\n")


def _record_text(record: Mapping) -> str:
    return "\n".join(t["value"].replace(IMAGE_TOKEN, "").strip() for t in record["conversations"])


def _train_tokenizer(out_dir: Path, plans: Dict[str, SplitPlan], vocab_size: int) -> None:
    from vir.demo.tokenizer import train_llama3_style_tokenizer

    texts = [_record_text(record) for plan in plans.values() for record in plan.records]
    train_llama3_style_tokenizer(texts, out_dir, vocab_size=vocab_size)


def _manifest(spec: SyntheticConfig, digest: str, plans: Dict[str, SplitPlan], seconds: float) -> Dict:
    counts = {}
    for name, plan in plans.items():
        counts[name] = {
            "records": len(plan.records),
            "images": len(plan.images),
            "multi_turn": plan.multi_turn,
            "text_only": plan.text_only,
            "captions": plan.captions,
            "question_types": dict(sorted(plan.question_types.items())),
        }
    broken = [
        {"id": image.record_id, "image": image.path, "kind": image.broken}
        for plan in plans.values()
        for image in plan.images
        if image.broken
    ]
    return {
        "generator_version": GENERATOR_VERSION,
        "spec_hash": digest,
        "spec": asdict(spec),
        "splits": list(SPLITS),
        "counts": counts,
        "broken": broken,
        "generation_seconds": round(seconds, 2),
    }
