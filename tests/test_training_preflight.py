"""`vir-train` stops before any weight loads, with one line naming the key and the fix and exit status 2, for every
mistake a config alone can make (training.preflight)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from training_fixtures import run_overrides, tiny_bases, vir_train_fails

from vir.training import run as run_module


@pytest.fixture(scope="session")
def bases(tmp_path_factory):
    return tiny_bases(tmp_path_factory)


def _fails(monkeypatch, capsys, overrides: list[str]) -> str:
    """Run `vir-train OVERRIDES` in-process; return its one-line error (asserting no model was built)."""
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr(run_module, "build_model", no_model)
    return vir_train_fails(monkeypatch, capsys, overrides)


def _wrong_projector(tmp_path):
    path = tmp_path / "mm_projector.bin"
    torch.save({"model.mm_projector.0.weight": torch.zeros(32, 48), "model.mm_projector.0.bias": torch.zeros(32),
                "model.mm_projector.2.weight": torch.zeros(32, 32), "model.mm_projector.2.bias": torch.zeros(32)}, path)
    return path


def _tower_dir(tmp_path):
    """A directory shaped like a CLIP vision tower's (config.json only: the check reads nothing else)."""
    return _config_dir(tmp_path / "clip", {"model_type": "clip_vision_model", "hidden_size": 32})


def _lora_run_dir(tmp_path):
    """A vir LoRA run's files as far as the check reads them: a llava_llama config and an adapter, no weights."""
    path = _config_dir(tmp_path / "lora_run", {"model_type": "llava_llama"})
    (path / "model.safetensors").unlink()
    (path / "adapter_config.json").write_text("{}")
    (path / "adapter_model.safetensors").write_text("")
    return path


def _llm_dir(tmp_path):
    return _config_dir(tmp_path / "llama", {"model_type": "llama", "hidden_size": 32})


def _empty_dir(tmp_path):
    path = tmp_path / "empty"
    path.mkdir(exist_ok=True)
    return path


def _config_dir(path, config):
    """A model directory as far as the checks read it: its config.json, and a (here empty) weight file."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_text("")
    return path


CASES = {
    "output dir under a file": (lambda t: [f"training.output_dir={t / 'a_file' / 'run'}"],
                                r"training.output_dir=.*a_file is a file, not a directory"),
    "output dir in a system tree": (lambda t: ["training.output_dir=/proc/vir-run"],
                                    r"training.output_dir=/proc/vir-run is a system directory"),
    "output dir the root": (lambda t: ["training.output_dir=/"], r"training.output_dir=/ is a system directory"),
    "output dir /etc": (lambda t: ["training.output_dir=/etc"], r"training.output_dir=/etc is a system directory"),
    "output dir under /usr": (lambda t: ["training.output_dir=/usr/local/run"],
                              r"training.output_dir=/usr/local/run is a system directory"),
    "NaN learning rate": (lambda t: ["training.learning_rate=nan"],
                          r"training.learning_rate=nan must be a finite number >= 0.0"),
    "negative learning rate": (lambda t: ["training.learning_rate=-1e-4"],
                               r"training.learning_rate=-0.0001 must be a finite number >= 0.0"),
    "infinite projector rate": (lambda t: ["training.mm_projector_lr=inf"],
                                r"training.mm_projector_lr=inf must be a finite number >= 0.0 \(or null\)"),
    "LoRA rank 0": (lambda t: ["training.lora_r=0"], r"training.lora_r=0 must be a finite number >= 1"),
    "LoRA dropout 1": (lambda t: ["training.lora_dropout=1.0"], r"training.lora_dropout=1.0 must be in \[0, 1\)"),
    "no steps": (lambda t: ["training.max_steps=0"], r"training.max_steps=0 must be >= 1, or -1"),
    "zero epochs": (lambda t: ["training.num_train_epochs=0"], r"training.num_train_epochs=0.0 must be a finite"),
    "unknown template": (lambda t: ["data.template=nonexistent"],
                         r"data.template=nonexistent is not one of llama3, plain"),
    "unknown aspect ratio": (lambda t: ["data.image_aspect_ratio=stretch"],
                             r"data.image_aspect_ratio=stretch is not one of pad, crop"),
    "unknown scheduler": (lambda t: ["training.lr_scheduler_type=bogus"],
                          r"training.lr_scheduler_type=bogus is not one of linear, cosine"),
    "warm-up longer than the run": (lambda t: ["training.warmup_ratio=2"], r"training.warmup_ratio=2.0 must be in "
                                                                           r"\[0, 1\)"),
    "LoRA run as the LLM": (lambda t: [f"model.llm.path={_lora_run_dir(t)}"],
                            r"model.llm.path=.* holds no model weights .*it holds a LoRA adapter; fold it into its "
                            r"base with `vir-merge RUN OUT`"),
    "output dir inside the LLM directory": (lambda t: [f"model.llm.path={_llm_dir(t)}",
                                                       f"training.output_dir={t / 'llama' / 'run'}"],
                                            r"training.output_dir=.*llama/run lies in model.llm.path=.*llama: "
                                            r"a run writes"),
    "save every 0 steps": (lambda t: ["training.save_steps=0"], r"training.save_steps=0 must be a finite number >= 1"),
    "LLM directory of a tower": (lambda t: [f"model.llm.path={_tower_dir(t)}"],
                                 r"model.llm.path=.* holds a 'clip_vision_model' model \(not a causal language "
                                 r"model transformers knows\); model.llm.path takes a decoder-only causal LM"),
    "tower directory of an LLM": (lambda t: [f"model.vision_tower.path={_llm_dir(t)}"],
                                  r"model.vision_tower.path=.* holds a 'llama' model; model.vision_tower.path takes "
                                  r"clip or clip_vision_model"),
    "model directory without config.json": (lambda t: [f"model.vision_tower.path={_empty_dir(t)}"],
                                            r"model.vision_tower.path=.* has no config.json"),
    "tokenizer directory without a tokenizer": (lambda t: [f"model.tokenizer_path={_empty_dir(t)}"],
                                                r"model.tokenizer_path=.* holds no tokenizer"),
    "quantised full fine-tuning": (lambda t: ["training=stage2_full", "model.llm.quantization=nf4"],
                                   r"model.llm.quantization=nf4 .*stage2_lora \(QLoRA\), not stage2_full"),
    "plain template in stage 2": (lambda t: ["data.template=plain"],
                                  r"data.template=plain .* training.mode=stage2_lora .* \(data.template=auto, or one "
                                  r"of llama3, "),
    "no global batch": (lambda t: ["training.global_batch_size=0"], r"training.global_batch_size=0 must be >= 1"),
    "projector of another model": (lambda t: [f"model.pretrained_projector={_wrong_projector(t)}"],
                                   r"model.pretrained_projector=.* does not fit this model .*vision width 32"),
    "bf16 and fp16": (lambda t: ["training.bf16=true", "training.fp16=true"], r"training.bf16 and training.fp16"),
    "missing image folder": (lambda t: [f"data.image_folder={t / 'nowhere'}"],
                             r"data.image_folder=.*nowhere is not a directory"),
    "missing LLM directory": (lambda t: [f"model.llm.path={t / 'nowhere'}"],
                              r"model.llm.path=.*nowhere is not a directory"),
    "missing projector file": (lambda t: [f"model.pretrained_projector={t / 'none.bin'}"],
                               r"model.pretrained_projector=.*none.bin: no such file"),
    "missing checkpoint": (lambda t: [f"training.resume_from_checkpoint={t / 'checkpoint-9'}"],
                           r"training.resume_from_checkpoint=.*checkpoint-9: no such directory"),
    "no token budget": (lambda t: ["training.max_tokens_per_batch=0"],
                        r"training.max_tokens_per_batch=0 must be >= 1 \(or null\)"),
    "no packed row": (lambda t: ["data.packing=true", "data.pack_row_tokens=-5"],
                      r"data.pack_row_tokens=-5 must be >= 1"),
    "LoRA with a trained tower": (lambda t: ["model.vision_tower.freeze=false"],
                                  r"stage2_lora cannot train the vision tower"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_config_mistake_is_one_line_before_any_model_loads(case, bases, tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("not a directory")
    extra, message = CASES[case]
    overrides = run_overrides(bases, tmp_path / "run", "stage2_lora", *extra(tmp_path))
    err = _fails(monkeypatch, capsys, overrides)
    assert re.search(message, err), err
    assert not (tmp_path / "run").exists()  # nothing written


def test_the_output_dir_probe_leaves_nothing_behind(tmp_path):
    from vir.training.preflight import check_output_dir

    check_output_dir(str(tmp_path / "a" / "b" / "run"))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    check_output_dir(str(tmp_path / "kept"))
    assert (tmp_path / "kept").is_dir() and list((tmp_path / "kept").iterdir()) == []


def test_another_process_checking_while_the_main_one_probes_sees_no_file(tmp_path):
    """Under torchrun the other ranks check the output directory (probe=False) while the main one creates and
    removes it for its probe: a directory that vanishes mid-check is not "a file" (a 2-process launch failed so,
    now and then, before the check took one stat per directory)."""
    import threading

    from vir.training.preflight import check_output_dir
    from vir.utils.config import ConfigError

    run = tmp_path / "out" / "run"
    stop = threading.Event()

    def churn():  # the main process's probe, over and over
        while not stop.is_set():
            run.mkdir(parents=True, exist_ok=True)
            run.rmdir()
            run.parent.rmdir()

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(3000):
            check_output_dir(str(run), probe=False)
    finally:
        stop.set()
        thread.join()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError, match="a_file is a file, not a directory"):
        check_output_dir(str(tmp_path / "a_file" / "run"), probe=False)


def test_bf16_where_the_device_cannot_compute_it_is_one_line(bases, tmp_path, monkeypatch, capsys):
    from vir.training import preflight

    monkeypatch.setattr(preflight, "_cpu_bf16_works", lambda: False)
    monkeypatch.setattr(preflight.torch.cuda, "is_available", lambda: False)
    err = _fails(monkeypatch, capsys, run_overrides(bases, tmp_path / "run", "stage2_lora", "training.bf16=true"))
    assert "training.bf16: this CPU's PyTorch cannot compute in bfloat16; set training.bf16=false" in err
