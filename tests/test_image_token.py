"""`model.image_token` flows from the config through builder, dataset, collator, validate, generate, eval and
chat: a run whose records tag images with `<img>` trains, validates, evaluates and chats with that tag."""

from __future__ import annotations

import json
from pathlib import Path

from training_fixtures import run_config, tiny_bases, train

from vir.cli import validate
from vir.cli.chat import ChatSession
from vir.data.dataset import LazySupervisedDataset
from vir.inference.evaluate import evaluate_run, load_eval_items
from vir.models.checkpoint import load_run

TOKEN = "<img>"


def _retag(source: Path, target: Path) -> Path:
    """`source`'s records with every `<image>` tag written as TOKEN."""
    records = json.loads(source.read_text())
    for record in records:
        for turn in record["conversations"]:
            turn["value"] = turn["value"].replace("<image>", TOKEN)
    target.write_text(json.dumps(records))
    return target


def test_a_non_default_image_token_runs_the_whole_path(tmp_path_factory, tmp_path, capsys):
    bases = tiny_bases(tmp_path_factory)
    data = bases.data
    paths = {split: _retag(getattr(data, split), tmp_path / f"{split}.json") for split in ("train", "eval", "test")}
    assert TOKEN in paths["train"].read_text() and "<image>" not in paths["train"].read_text()
    cfg = run_config(bases, tmp_path / "run", "stage2_lora", "training.max_steps=2", "training.save_steps=2",
                     f"model.image_token='{TOKEN}'", f"data.train_path={paths['train']}",
                     f"data.eval_path={paths['eval']}", f"data.test_path={paths['test']}")
    assert cfg.model.image_token == TOKEN

    # vir-validate reads the tags with the configured token: every image record has its image block.
    assert validate.run(cfg) == 0
    assert "images" in capsys.readouterr().out

    samples = load_eval_items(paths["eval"], data.root, TOKEN)[:2]
    run = train(cfg, visualizer_samples=samples)
    model = run.model.get_base_model()
    tokenizer = run.trainer.processing_class
    image_id = tokenizer.convert_tokens_to_ids(TOKEN)
    assert model.config.image_token == TOKEN and model.config.image_token_id == image_id
    assert "<image>" not in tokenizer.get_vocab()

    # The dataset expands each tag into the model's image tokens (an untagged image would get a default tag).
    dataset = LazySupervisedDataset(paths["train"], tokenizer, run.trainer.image_processor,
                                    num_image_tokens=model.config.num_image_tokens, image_folder=data.root,
                                    image_token=TOKEN)
    record = next(i for i, n in enumerate(dataset.modality_lengths) if n > 0)
    raw = json.loads(paths["train"].read_text())[record]
    tags = sum(turn["value"].count(TOKEN) for turn in raw["conversations"])
    item = dataset[record]
    assert tags >= 1 and int((item["input_ids"] == image_id).sum()) == tags * model.config.num_image_tokens
    assert item["pixel_values"].shape[0] == tags
    assert TOKEN not in tokenizer.decode(item["input_ids"][item["input_ids"] != image_id])  # no tag left as text

    # vir-eval and vir-chat on the saved run use the run's token.
    metrics = evaluate_run(run.output_dir, split="test", limit=4, max_new_tokens=3, batch_size=4)
    assert metrics["n"] == 4
    loaded, loaded_tokenizer, processor, run_cfg = load_run(run.output_dir)
    assert run_cfg.model.image_token == TOKEN and loaded.config.image_token == TOKEN
    session = ChatSession(loaded, loaded_tokenizer, processor, run_cfg, max_new_tokens=3)
    session.reset(samples[0].query.images[:1])
    session.ask("What is in the picture?")
    assert session.messages[0].content.startswith(f"{TOKEN}\n")
