"""`vir-eval` and `vir-chat` on a tiny trained run directory."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from omegaconf import OmegaConf
from training_fixtures import RUNS

from vir.cli import chat
from vir.cli import eval as eval_cli


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return RUNS["stage2_lora"](tmp_path_factory).output_dir


def test_vir_eval_writes_metrics_with_blind_baseline_and_per_type(run_dir, capsys):
    (run_dir / "metrics.json").write_text(json.dumps({"accuracy": 0.5, "stages": {"stage2": {"steps": 3}}}))
    eval_cli.main([str(run_dir), "--split", "eval", "--limit", "5", "--max-new-tokens", "3"])
    out = capsys.readouterr().out
    # Another split never overwrites the run's test figures.
    assert json.loads((run_dir / "metrics.json").read_text())["accuracy"] == 0.5
    metrics = json.loads((run_dir / "metrics_eval.json").read_text())
    assert metrics["n"] == 5 and sum(row["n"] for row in metrics["per_type"].values()) == 5
    assert all({"accuracy", "blind_accuracy", "n"} <= set(row) for row in metrics["per_type"].values())
    rows = [json.loads(line) for line in (run_dir / "predictions_eval.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(row["prediction"] is not None and row["reference"] for row in rows)
    # The figures are the written predictions scored: each type's accuracy is its share of correct rows, the overall
    # one the share of all rows (`correct`, the normalised exact match, is tested in test_inference_scoring).
    for kind, row in metrics["per_type"].items():
        of_kind = [r["correct"] for r in rows if r["type"] == kind]
        assert row["n"] == len(of_kind) and row["accuracy"] == pytest.approx(sum(of_kind) / len(of_kind))
    assert metrics["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / 5)
    assert "overall" in out and "metrics_eval.json" in out


def test_vir_eval_on_the_test_split_keeps_what_training_wrote(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("checkpoint-*"))
    cfg = OmegaConf.load(run / "vir_config.yaml")
    cfg.data.test_path = cfg.data.eval_path  # the fixture's run has no test split of its own
    OmegaConf.save(cfg, run / "vir_config.yaml")
    (run / "metrics.json").write_text(json.dumps({"accuracy": 0.5, "stages": {"stage2": {"steps": 3}}}))
    eval_cli.main([str(run), "--split", "test", "--limit", "4", "--max-new-tokens", "3", "--no-blind"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n"] == 4 and metrics["split"] == "test" and metrics["stages"] == {"stage2": {"steps": 3}}
    assert f"{run}/metrics.json" in capsys.readouterr().out


def test_vir_eval_on_a_missing_run_exits_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        eval_cli.main([str(tmp_path)])
    assert err.value.code == 2 and "vir_config.yaml" in capsys.readouterr().err


def test_vir_chat_one_shot_and_interactive(run_dir, capsys, monkeypatch):
    # An eval image of the run's own data (a glob over the temp root could pick another test's broken file).
    image = sorted((Path(OmegaConf.load(run_dir / "vir_config.yaml").data.image_folder) / "images").glob("eval_*.png"))[0]
    chat.main([str(run_dir), "--image", str(image), "--prompt", "How many red objects are there?",
               "--max-new-tokens", "3"])
    one_shot = capsys.readouterr().out.strip()
    monkeypatch.setattr("sys.stdin", io.StringIO("How many red objects are there?\n/reset\nHi\n/quit\n"))
    chat.main([str(run_dir), "--image", str(image), "--max-new-tokens", "3"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "assistant>" in line]
    assert len(lines) == 2 and lines[0].split("assistant> ", 1)[1].strip() == one_shot


def test_vir_chat_takes_several_images_in_order(run_dir, monkeypatch):
    images = sorted((Path(OmegaConf.load(run_dir / "vir_config.yaml").data.image_folder) / "images").glob("eval_*.png"))
    seen = []
    monkeypatch.setattr(chat, "generate_answers", lambda *args, **kwargs: seen.append(args[3][0]) or ["ok"])
    chat.main([str(run_dir), "--image", str(images[1]), "--image", str(images[0]), "--prompt", "Same?"])
    query = seen[0]
    assert query.messages[0].content == "<image>\n<image>\nSame?" and len(query.images) == 2
    assert [image.size for image in query.images] == [Image.open(images[1]).size, Image.open(images[0]).size]


def test_vir_chat_missing_image_exits_with_a_message(run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        chat.main([str(run_dir), "--image", str(tmp_path / "nope.png"), "--prompt", "hi"])
    assert err.value.code == 2 and "nope.png" in capsys.readouterr().err
