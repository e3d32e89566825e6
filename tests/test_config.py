"""Hydra composition of the shipped config tree and the unknown-key errors."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources

import pytest
from omegaconf import OmegaConf

from vir.utils.config import ConfigError, compose_config


def _group_options(group: str) -> list[str]:
    root = resources.files("vir.conf") / group
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def _group_file(group: str, option: str) -> dict:
    text = (resources.files("vir.conf") / group / f"{option}.yaml").read_text()
    return OmegaConf.to_container(OmegaConf.create(text), resolve=False)


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if key == "defaults":
            continue
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_default_composition_runs_nothing_by_surprise():
    """No experiment by default: a user's LLaVA stage-2 LoRA run whose model directories must be named."""
    cfg = compose_config()
    assert cfg.experiment_name == "default" and cfg.recipe.name == "single" and cfg.demo is None
    assert OmegaConf.is_missing(cfg.model.llm, "path") and OmegaConf.is_missing(cfg.model.vision_tower, "path")
    assert cfg.training.mode == "stage2_lora" and cfg.model.model_max_length == 2048
    assert (cfg.training.lora_r, cfg.training.lora_alpha, cfg.training.mm_projector_lr) == (128, 256, 2e-5)


def test_local_debug_is_the_demo():
    cfg = compose_config(["experiment=local_debug"])
    assert cfg.experiment_name == "local_debug" and cfg.recipe.name == "synthetic_llava"
    assert cfg.model.llm.path is None and cfg.model.llm.hidden_size == 128
    assert cfg.demo.bases.output_dir == f"{cfg.training.output_dir}/bases"
    assert cfg.demo.bases.source == "vir:demo/assets/bases/local_debug"


def test_tiny_model_group_keeps_llava_defaults():
    cfg = compose_config(["model=tiny"])
    assert cfg.model.vision_tower.select_layer == -2 and cfg.model.vision_tower.select_feature == "patch"
    assert cfg.recipe.name == "single"


@pytest.mark.parametrize("experiment", _group_options("experiment"))
def test_every_experiment_composes_to_what_its_file_says(experiment):
    """Every key an experiment file sets ends up in the composed config (later files in its chain may override:
    compare with the file's own value only where no experiment later in the chain sets it)."""
    cfg = compose_config([f"experiment={experiment}"])
    chain, name = [], experiment
    while name:  # an experiment's defaults may name one other experiment it builds on
        tree = _group_file("experiment", name)
        chain.append(tree)
        parents = [d for d in tree.get("defaults", []) if isinstance(d, str) and d != "_self_"]
        name = parents[0] if parents else None
    expected = {}
    for tree in reversed(chain):
        expected.update(dict(_leaves(tree)))
    assert expected["experiment_name"] == experiment
    for key, value in expected.items():
        if isinstance(value, str) and "${" in value:
            continue
        assert OmegaConf.select(cfg, key) == value, key


@pytest.mark.parametrize("group", ["model", "data", "training", "debug"])
def test_every_group_option_composes_to_its_values(group):
    for option in _group_options(group):
        cfg = compose_config([f"{group}={option}"])
        prefix = "" if group == "debug" else f"{group}."  # debug files are `@package _global_`
        for key, value in _leaves(_group_file(group, option)):
            if value == "???":
                parent, _, leaf = f"{prefix}{key}".rpartition(".")
                assert OmegaConf.is_missing(OmegaConf.select(cfg, parent), leaf), (option, key)
            else:
                assert OmegaConf.select(cfg, f"{prefix}{key}") == value, (option, key)


def test_command_line_group_choice_wins_over_the_experiment():
    cfg = compose_config(["experiment=local_debug", "model=tiny", "training=stage1", "training.max_steps=7"])
    tiny = _group_file("model", "tiny")
    assert cfg.model.llm.hidden_size == tiny["llm"]["hidden_size"]
    assert cfg.model.vision_tower.select_layer == tiny["vision_tower"]["select_layer"]
    assert (cfg.training.mode, cfg.training.learning_rate, cfg.training.max_steps) == ("stage1", 1e-3, 7)
    assert cfg.recipe.name == "synthetic_llava"  # what the experiment is about stays


def test_public_keys_exist():
    cfg = compose_config(
        [
            "data.train_path=a.json",
            "data.eval_path=b.json",
            "data.image_folder=img",
            "data.template=plain",
            "model.llm.path=/m/llama",
            "model.vision_tower.path=/m/clip",
            "training.output_dir=/tmp/run",
        ]
    )
    assert cfg.model.llm.path == "/m/llama" and cfg.training.output_dir == "/tmp/run"


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.llm.hiden_size=3", "model.llm.hiden_size"),
        ("+model.llm.hiden=3", "model.llm.hiden"),
        ("+trainin.lr=1", "trainin"),
        ("training.max_steps=abc", "training.max_steps"),
    ],
)
def test_unknown_or_mistyped_key_fails_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        compose_config([override])
    assert key.split(".")[-1] in str(err.value)


def test_unknown_experiment_lists_the_choices():
    with pytest.raises(ConfigError, match="local_debug"):
        compose_config(["experiment=does_not_exist"])


def test_cli_reports_bad_key_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-c", "from vir.cli.validate import main; main()", "data.tempalte=x"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "tempalte" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_prints_composed_config():
    proc = subprocess.run(
        [sys.executable, "-c", "from vir.cli.validate import main; main()", "--cfg", "job", "seed=7"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "seed: 7" in proc.stdout


def test_cli_reports_errors_the_user_can_fix_without_traceback(monkeypatch, capsys):
    from vir.demo.common import BaseMismatchError
    from vir.utils.config import cli_entry

    def run(cfg):
        raise BaseMismatchError("demo.bases.source=somewhere: its LLM base was built for other inputs")

    monkeypatch.setattr(sys, "argv", ["vir-train", "seed=3"])
    with pytest.raises(SystemExit) as err:
        cli_entry(run)()
    assert err.value.code == 2
    expected = "vir-train: demo.bases.source=somewhere: its LLM base was built for other inputs"
    assert capsys.readouterr().err.strip() == expected

    def bug(cfg):
        raise KeyError("a bug keeps its traceback")

    with pytest.raises(KeyError):
        cli_entry(bug)()


def test_vir_train_with_nothing_to_train_says_what_to_pass():
    proc = subprocess.run([sys.executable, "-m", "vir.cli.train"], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "data.train_path" in lines[0] and "experiment=local_debug" in lines[0]


def test_vir_train_without_model_directories_names_the_keys(tmp_path):
    data = tmp_path / "train.json"
    data.write_text("[]")
    proc = subprocess.run([sys.executable, "-m", "vir.cli.train", f"data.train_path={data}"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.llm.path and model.vision_tower.path" in proc.stderr
