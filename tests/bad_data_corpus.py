"""A corpus of everything that goes wrong in real LLaVA-format data, with the outcome each case must have.

    corpus = build_corpus(tmp_path / "corpus")   # writes images/, corpus.json, corpus.jsonl and two cut files

Outcomes (`Case.outcome`):
- `ok`: trains normally (every image format and PIL mode, EXIF-rotated, 1x1, 10000x20, non-ASCII and
  right-to-left text, a record without an id, duplicated ids, an unanswered final user turn);
- `fallback:<status>`: trains with a black image, counted by status (`corrupt`, `missing`, `refused`,
  `too_large`) under the record's id; paths the OS refuses too (a symlink loop, a 300-character name, a named
  pipe, which must never be opened, and a directory);
- `truncated`: trains, cut to `model_max_length`;
- `skipped`: cannot train at `model_max_length` (its image would be cut), replaced and counted by id;
- `invalid:<reason fragment>`: rejected at load by id and reason, listed by `vir-validate` and `data_stats.json`
  (a `null` in the list of records by its position, `#<position>`).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
from PIL import Image

MODEL_MAX_LENGTH = 160  # with 16 image tokens (the tiny bases' 32 px tower, 8 px patches)


@dataclass(frozen=True)
class Case:
    id: str  # as the dataset names it (`#<position>` for the record without an id)
    outcome: str
    record: Any


@dataclass(frozen=True)
class Corpus:
    root: Path
    json: Path
    jsonl: Path
    cut_jsonl: Path  # line 3 of 4 is cut in the middle of a record
    cut_json: Path  # a JSON list that ends early
    cases: List[Case]

    def ids(self, prefix: str) -> Dict[str, str]:
        """{record id: outcome} of the cases whose outcome starts with `prefix`."""
        return {c.id: c.outcome for c in self.cases if c.outcome.startswith(prefix)}


def _qa(question: str = "What is in the picture?", answer: str = "A red square.", image: bool = True) -> list:
    return [{"from": "human", "value": ("<image>\n" if image else "") + question}, {"from": "gpt", "value": answer}]


def _image(mode: str, size=(24, 16)) -> Image.Image:
    rng = np.random.default_rng(sum(map(ord, mode)))
    rgb = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65535, (size[1], size[0])).astype(np.uint16)).convert("I;16")
    if mode == "P":
        return rgb.quantize(16)
    return rgb.convert(mode)


def _write_images(images: Path) -> Dict[str, str]:
    """Write every image case; returns {case name: path as a record names it}."""
    images.mkdir(parents=True, exist_ok=True)
    paths = {}
    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("GIF", "gif"), ("BMP", "bmp")):
        _image("RGB").save(images / f"format.{ext}", fmt)
        paths[f"format_{ext}"] = f"images/format.{ext}"
    for mode, ext in (("L", "png"), ("LA", "png"), ("P", "png"), ("RGBA", "png"), ("CMYK", "jpg"), ("I;16", "png"),
                      ("1", "png")):
        name = mode.replace(";", "")
        _image(mode).save(images / f"mode_{name}.{ext}")
        paths[f"mode_{name}"] = f"images/mode_{name}.{ext}"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, rotate 90 degrees clockwise to view
    _image("RGB", (16, 24)).save(images / "exif_rotated.jpg", exif=exif)
    paths["exif_rotated"] = "images/exif_rotated.jpg"
    _image("RGB", (1, 1)).save(images / "one_pixel.png")
    paths["one_pixel"] = "images/one_pixel.png"
    _image("RGB", (10000, 20)).save(images / "very_wide.png")
    paths["very_wide"] = "images/very_wide.png"
    # corrupt, truncated, empty and missing files; a decompression bomb (10^8 pixels, a few KB on disk)
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    buffer = io.BytesIO()
    _image("RGB", (64, 64)).save(buffer, "PNG")
    (images / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (images / "empty.png").write_bytes(b"")
    Image.new("1", (10000, 10000)).save(images / "bomb.png")
    paths.update(corrupt="images/corrupt.png", truncated="images/truncated.png", empty="images/empty.png",
                 missing="images/nowhere.png", bomb="images/bomb.png")
    # escapes: a file outside the image folder reached by `..`, by an absolute path, and by a symlink
    outside = images.parent.parent / "outside.png"
    _image("RGB").save(outside)
    (images / "escape_link.png").unlink(missing_ok=True)
    (images / "escape_link.png").symlink_to(outside)
    paths.update(escape_dotdot="../outside.png", escape_absolute=str(outside), escape_symlink="images/escape_link.png")
    # paths the OS refuses: a symlink loop, a name over the file system's 255 bytes, a named pipe (reading it would
    # wait for a writer forever), a directory
    for link, target in (("loop_a.png", "loop_b.png"), ("loop_b.png", "loop_a.png")):
        (images / link).unlink(missing_ok=True)
        (images / link).symlink_to(target)
    if not (images / "pipe.png").exists():
        os.mkfifo(images / "pipe.png")
    (images / "folder.png").mkdir(exist_ok=True)
    paths.update(symlink_loop="images/loop_a.png", long_name="images/" + "n" * 300 + ".png", pipe="images/pipe.png",
                 directory="images/folder.png")
    return paths


def build_corpus(root: Path) -> Corpus:
    root.mkdir(parents=True, exist_ok=True)
    paths = _write_images(root / "images")
    cases: List[Case] = []

    def add(case_id: str, outcome: str, **record: Any) -> None:
        cases.append(Case(case_id, outcome, {"id": case_id, **record}))

    for name in [n for n in paths if n.startswith(("format_", "mode_"))] + ["exif_rotated", "one_pixel", "very_wide"]:
        add(f"img_{name}", "ok", image=paths[name], conversations=_qa())
    for name, status in (("corrupt", "corrupt"), ("truncated", "corrupt"), ("empty", "corrupt"),
                         ("missing", "missing"), ("bomb", "too_large"), ("escape_dotdot", "refused"),
                         ("escape_absolute", "refused"), ("escape_symlink", "refused"), ("symlink_loop", "corrupt"),
                         ("long_name", "missing"), ("pipe", "missing"), ("directory", "missing")):
        add(f"img_{name}", f"fallback:{status}", image=paths[name], conversations=_qa())
    add("two_images", "ok", image=[paths["format_png"], paths["mode_L"]],
        conversations=_qa("<image> and <image>: which is brighter?", "The second.", image=False))
    add("text_only", "ok", conversations=_qa("What is two plus two?", "Four.", image=False))
    add("unicode_rtl", "ok", image=paths["format_png"],
        conversations=_qa("ما هذا؟ これは何ですか", "שלום — ein Würfel, 立方体 🙂"))
    add("unanswered_final_turn", "ok", image=paths["format_png"],
        conversations=[*_qa(), {"from": "human", "value": "And its size?"}])
    add("dup", "ok", image=paths["format_png"], conversations=_qa())
    add("dup", "ok", image=paths["format_jpg"], conversations=_qa("Colour?", "Red."))
    add("overlong_prompt", "skipped", image=paths["format_png"],  # its image lies past the cut
        conversations=[{"from": "human", "value": "Describe " * 200 + "<image>"}, {"from": "gpt", "value": "Red."}])
    add("overlong_answer", "truncated", image=paths["format_png"], conversations=_qa(answer="red " * 300))
    add("no_conversations", "invalid:no 'conversations'", image=paths["format_png"])
    add("unknown_role", "invalid:unknown role 'robot'", conversations=[{"from": "robot", "value": "hi"}])
    add("gpt_first", "invalid:the first non-system turn (turn 0) is assistant",
        conversations=list(reversed(_qa(image=False))))
    add("two_humans", "invalid:roles do not alternate",
        conversations=[{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                       {"from": "gpt", "value": "c"}])
    add("empty_answer", "invalid:turn 1 (assistant) is empty", conversations=_qa(answer="  ", image=False))
    add("tag_count", "invalid:2 <image> tag(s) but 1 image(s)", image=paths["format_png"],
        conversations=_qa("<image><image> what?", "Red.", image=False))
    add("tag_in_answer", "invalid:<image> tag in assistant turn 1", image=paths["format_png"],
        conversations=[{"from": "human", "value": "What?"}, {"from": "gpt", "value": "<image> red"}])
    add("non_string", "invalid:content must be a string",
        conversations=[{"from": "human", "value": 42}, {"from": "gpt", "value": "yes"}])
    records = [case.record for case in cases]
    records.append({"image": paths["format_png"], "conversations": _qa()})  # no id: named by its position
    cases.append(Case(f"#{len(records) - 1}", "ok", records[-1]))
    records.append(None)  # not a record at all: no id to read, so named by its position too
    cases.append(Case(f"#{len(records) - 1}", "invalid:expected a JSON object, got null", None))

    corpus_json = root / "corpus.json"
    corpus_json.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    corpus_jsonl = root / "corpus.jsonl"
    corpus_jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    lines = [json.dumps(r) for r in records[:4]]
    lines[2] = lines[2][: len(lines[2]) // 2]
    cut_jsonl = root / "cut.jsonl"
    cut_jsonl.write_text("\n".join(lines) + "\n")
    cut_json = root / "cut.json"
    cut_json.write_text(corpus_json.read_text()[:5000])
    return Corpus(root, corpus_json, corpus_jsonl, cut_jsonl, cut_json, cases)
