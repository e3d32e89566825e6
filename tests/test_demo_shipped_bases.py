"""The bases `make train` starts from (`demo.bases.source: vir:demo/assets/bases/local_debug`) fit `experiment=local_debug`.

Their fingerprints hash everything that shaped them (data spec and tokenizer, model sizes, `bases.*`, the
document list); when a change to any of these moves `local_debug`'s fingerprints, this test fails here rather
than `make train` failing on a user's machine. Rebuild them with `vir-train experiment=synthetic_gpu` on a GPU
(src/vir/demo/assets/bases/local_debug/README.md).
"""

from __future__ import annotations

import json

import pytest
from transformers import LlamaForCausalLM

from vir.demo import llm_base, vision_base
from vir.demo.bases import build_bases, resolve_source
from vir.demo.common import PRETRAIN_METRICS_FILE
from vir.utils.config import compose_config


def test_the_shipped_bases_are_in_the_package_with_the_records_of_their_training():
    """This reads the records written when the bases were trained (their fingerprints, step count and the LLM
    base's held-out accuracy then): it checks the record, not the weights. The weights are checked by the next
    test (their fingerprints still match) and by `make train`'s figure, which starts from them."""
    source = resolve_source(compose_config(["experiment=local_debug"]).demo.bases.source)
    for sub in ("llm", "clip"):
        metrics = json.loads((source / sub / PRETRAIN_METRICS_FILE).read_text())
        assert len(metrics["fingerprint"]) == 16
    llm = json.loads((source / "llm" / PRETRAIN_METRICS_FILE).read_text())
    assert llm["steps"] == compose_config(["experiment=local_debug"]).demo.bases.llm.max_steps
    assert llm["final"]["accuracy"]["overall"] >= 0.9  # recorded when trained; the README's figures start here


@pytest.mark.slow
def test_local_debug_reuses_the_shipped_bases_without_training(tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("experiment=local_debug would retrain a shipped base: its fingerprint moved")

    monkeypatch.setattr(vision_base, "_train", no_training)
    monkeypatch.setattr(llm_base, "_train", no_training)
    cfg = compose_config(["experiment=local_debug", f"data.image_folder={tmp_path / 'data'}"])
    llm_dir, clip_dir = build_bases(tmp_path / "bases", cfg)
    model = LlamaForCausalLM.from_pretrained(str(llm_dir))
    assert model.config.hidden_size == cfg.model.llm.hidden_size
    assert (clip_dir / "model.safetensors").is_file()
