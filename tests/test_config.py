"""Hydra composition of the shipped config tree and the unknown-key errors."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources

import pytest

from vir.utils.config import ConfigError, compose_config


def _group_options(group: str) -> list[str]:
    root = resources.files("vir.conf") / group
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def test_default_composition_is_local_debug():
    cfg = compose_config()
    assert cfg.experiment_name == "local_debug"
    assert cfg.model.llm.path is None
    assert cfg.data.template == "llama3"
    assert cfg.recipe.name == "synthetic_llava"
    assert cfg.bases.output_dir == f"{cfg.training.output_dir}/bases"


def test_tiny_model_group_alone_keeps_llava_defaults():
    cfg = compose_config(["~experiment"])
    assert cfg.model.vision_tower.select_layer == -2 and cfg.model.vision_tower.select_feature == "patch"
    assert cfg.recipe.name == "single"


@pytest.mark.parametrize("experiment", _group_options("experiment"))
def test_every_experiment_composes(experiment):
    cfg = compose_config([f"experiment={experiment}"])
    assert cfg.training.output_dir


@pytest.mark.parametrize("group", ["model", "data", "training", "debug"])
def test_every_group_option_composes(group):
    for option in _group_options(group):
        compose_config([f"{group}={option}"])


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
    from vir.recipes.common import BaseMismatchError
    from vir.utils.config import cli_entry

    def run(cfg):
        raise BaseMismatchError("bases.source=somewhere: its LLM base was built for other inputs")

    monkeypatch.setattr(sys, "argv", ["vir-train", "seed=3"])
    with pytest.raises(SystemExit) as err:
        cli_entry(run)()
    assert err.value.code == 2
    expected = "vir-train: bases.source=somewhere: its LLM base was built for other inputs"
    assert capsys.readouterr().err.strip() == expected

    def bug(cfg):
        raise KeyError("a bug keeps its traceback")

    with pytest.raises(KeyError):
        cli_entry(bug)()
