"""A command printed in the README is a test case.

Every `vir-...` line of README.md's ```bash blocks (and the `vir-eval` / `vir-chat` commands written inline in
section 5) is parsed here. The Hydra ones (vir-train, vir-validate, vir-plan) are composed with the shipped config tree,
their placeholder paths moved under tmp_path, and everything the user typed must survive composition; the
argparse ones must be accepted by the console script's parser. tests/test_user_path_real_format.py then runs
the README's train commands end to end.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, ListConfig, OmegaConf
from readme_commands import (
    CONSOLE_SCRIPTS,
    HYDRA_PROGRAMS,
    README,
    command_for,
    inline_commands,
    localized_args,
    readme_commands,
)

from vir.utils.config import compose_config

COMMANDS = readme_commands()
HYDRA_COMMANDS = [c for c in COMMANDS if c.program in HYDRA_PROGRAMS]
MODULES = {"vir-eval": "vir.cli.eval", "vir-chat": "vir.cli.chat", "vir-export": "vir.cli.export",
           "vir-merge": "vir.cli.merge", "vir-demo": "vir.cli.demo"}
ARGPARSE_COMMANDS = [c for c in COMMANDS + inline_commands() if c.program in MODULES]


def _ids(commands):
    return [f"{c.program}:{i}" for i, c in enumerate(commands)]


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _typed(arg: str):
    """The value of a `key=value` override as Hydra's own parser types it (`true` -> True, `1e-3` -> 0.001)."""
    return OverridesParser.create().parse_overrides([arg])[0].value()


def _group_file(group: str, option: str):
    """(leaves of conf/<group>/<option>.yaml as {dotted key: value}, the package prefix they compose under)."""
    text = (resources.files("vir.conf") / group / f"{option}.yaml").read_text()
    prefix = "" if "@package _global_" in text.split("\n\n", 1)[0] else f"{group}."
    tree = OmegaConf.to_container(OmegaConf.create(text), resolve=False)
    tree.pop("defaults", None)

    def leaves(node, path=""):
        for key, value in node.items():
            if isinstance(value, dict) and value:
                yield from leaves(value, f"{path}{key}.")
            else:
                yield f"{path}{key}", value

    return dict(leaves(tree)), prefix


def _compose(command, root: Path):
    args = localized_args(command, root)
    return args, compose_config(args)


# ---------------------------------------------------------------------------------------------- the parser


def test_the_readme_has_the_commands_this_file_checks():
    programs = [c.program for c in COMMANDS]
    assert programs.count("vir-validate") >= 1, programs
    assert programs.count("vir-train") >= 2, programs
    assert {c.program for c in ARGPARSE_COMMANDS} == set(MODULES), ARGPARSE_COMMANDS


def test_every_readme_command_is_an_installed_console_script():
    declared = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(CONSOLE_SCRIPTS) == set(declared)
    for command in COMMANDS + inline_commands():
        assert command.program in CONSOLE_SCRIPTS, command
        assert (Path(sys.executable).parent / command.program).is_file(), f"{command.program} is not installed"


def test_continued_lines_are_joined_into_one_command():
    stage2 = command_for(COMMANDS, "vir-train", training="stage2_lora", model="llama3_8b_clip_l336")
    assert "\\" not in stage2.line and "\n" not in stage2.line
    # Its last continuation line is part of the command, not a command of its own.
    assert stage2.overrides().get("training.gradient_checkpointing") == "true"
    assert not any(c.line.startswith(("data.", "model.", "training.")) for c in COMMANDS)


# ------------------------------------------------------------------- Hydra commands: vir-train, vir-validate, vir-plan


@pytest.mark.parametrize("command", HYDRA_COMMANDS, ids=_ids(HYDRA_COMMANDS))
def test_every_key_the_command_sets_survives_composition(command, tmp_path):
    args, cfg = _compose(command, tmp_path)
    keys = [arg for arg in args if "=" in arg and "." in arg.split("=", 1)[0]]
    assert keys or any("=" in arg for arg in args), command  # at least a group choice (`experiment=...`)
    for arg in keys:
        key = arg.split("=", 1)[0]
        assert _plain(OmegaConf.select(cfg, key)) == _typed(arg), (command.program, arg)


@pytest.mark.parametrize("command", HYDRA_COMMANDS, ids=_ids(HYDRA_COMMANDS))
def test_every_group_choice_composes_to_its_file_unless_the_command_overrides_it(command, tmp_path):
    args, cfg = _compose(command, tmp_path)
    set_keys = [arg.split("=", 1)[0] for arg in args if "=" in arg and "." in arg.split("=", 1)[0]]
    for arg in args:
        group, sep, option = arg.partition("=")
        if not sep or "." in group or group.startswith(("+", "~")):
            continue
        leaves, prefix = _group_file(group, option)
        assert leaves, f"{group}/{option}.yaml sets nothing"
        for key, value in leaves.items():
            full = prefix + key
            overridden = any(k == full or k.startswith(full + ".") or full.startswith(k + ".") for k in set_keys)
            if value == "???":
                # A required path the README must fill in itself.
                assert overridden, f"`{command.program}` leaves {full} (required by {group}={option}) unset"
                parent, _, leaf = full.rpartition(".")
                assert not OmegaConf.is_missing(OmegaConf.select(cfg, parent), leaf), full
            elif not overridden:
                assert _plain(OmegaConf.select(cfg, full)) == value, (f"{group}={option}", full)


def test_stage1_command_is_llava_stage1(tmp_path):
    command = command_for(COMMANDS, "vir-train", training="stage1", model="llama3_8b_clip_l336")
    _, cfg = _compose(command, tmp_path)
    assert cfg.training.mode == "stage1"
    assert cfg.data.template == "plain"
    assert cfg.training.learning_rate == pytest.approx(1e-3)
    assert cfg.training.lr_scheduler_type == "cosine" and cfg.training.warmup_ratio == pytest.approx(0.03)
    assert cfg.model.model_max_length == 2048
    assert cfg.model.vision_tower.select_layer == -2
    assert cfg.model.vision_tower.image_size == 336
    assert cfg.model.projector_type == "mlp2x_gelu"
    assert cfg.recipe.name == "single"
    assert cfg.model.pretrained_projector is None


def test_stage2_command_is_llava_lora_from_the_stage1_projector(tmp_path):
    stage1 = command_for(COMMANDS, "vir-train", training="stage1", model="llama3_8b_clip_l336")
    stage2 = command_for(COMMANDS, "vir-train", training="stage2_lora", model="llama3_8b_clip_l336")
    _, cfg1 = _compose(stage1, tmp_path)
    _, cfg = _compose(stage2, tmp_path)
    assert cfg.training.mode == "stage2_lora"
    assert cfg.training.lora_r == 128 and cfg.training.lora_alpha == 256
    assert cfg.training.learning_rate == pytest.approx(2e-4)
    assert cfg.training.mm_projector_lr == pytest.approx(2e-5)
    assert cfg.training.lr_scheduler_type == "cosine" and cfg.training.warmup_ratio == pytest.approx(0.03)
    assert cfg.model.model_max_length == 2048
    assert cfg.data.template == "llama3"
    assert cfg.recipe.name == "single"
    assert cfg.model.pretrained_projector == str(Path(cfg1.training.output_dir) / "mm_projector.bin")
    assert cfg.model.llm.path == cfg1.model.llm.path
    assert cfg.model.vision_tower.path == cfg1.model.vision_tower.path


def test_validate_command_checks_the_stage2_data_with_the_same_models(tmp_path):
    validate = command_for(COMMANDS, "vir-validate")
    stage2 = command_for(COMMANDS, "vir-train", training="stage2_lora", model="llama3_8b_clip_l336")
    _, cfg = _compose(validate, tmp_path)
    _, cfg2 = _compose(stage2, tmp_path)
    for key in ("model.llm.path", "model.vision_tower.path", "data.train_path", "data.image_folder"):
        assert OmegaConf.select(cfg, key) == OmegaConf.select(cfg2, key), key
    assert cfg.validate.split == "train" and cfg.validate.dump_dir == str(tmp_path / "tmp" / "check")


# ---------------------------------------- argparse commands: vir-eval, vir-chat, vir-export, vir-merge, vir-demo


@pytest.fixture(scope="module")
def help_texts():
    texts = {}
    for program, module in MODULES.items():
        proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        texts[program] = proc.stdout
    return texts


@pytest.mark.parametrize("command", ARGPARSE_COMMANDS, ids=_ids(ARGPARSE_COMMANDS))
def test_every_flag_in_the_command_is_in_its_help(command, help_texts):
    text = help_texts[command.program]
    assert f"usage: {command.program}" in text
    flags = [arg.split("=", 1)[0] for arg in command.args if arg.startswith("--")]
    for flag in flags:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), f"{command}: {flag} not in --help"


@pytest.mark.parametrize("command", ARGPARSE_COMMANDS, ids=_ids(ARGPARSE_COMMANDS))
def test_the_console_script_parses_the_command(command, monkeypatch, tmp_path, capsys):
    """The real `main(argv)` with the model loading stubbed out: argparse accepts the README's arguments."""
    from vir.cli import chat
    from vir.cli import eval as eval_cli
    from vir.cli import export as export_cli
    from vir.cli import merge as merge_cli

    args = localized_args(command, tmp_path)
    seen = {}
    if command.program in ("vir-export", "vir-merge"):
        def fake(run_dir, out_dir, **kwargs):
            seen.update(run_dir=run_dir, out_dir=out_dir, **kwargs)
            return out_dir

        if command.program == "vir-merge":
            monkeypatch.setattr(merge_cli, "merge_run", fake)
            merge_cli.main(args)
        else:
            monkeypatch.setattr(export_cli, "export_hf_llava", fake)
            monkeypatch.setattr(export_cli, "export_llava_original", lambda run, out, **kw: fake(run, out, llava=True))
            export_cli.main(args)
            assert seen.get("merge", True) is ("--no-merge" not in args)
            assert seen.get("llava", False) is ("llava" in args)
        assert (seen["run_dir"], seen["out_dir"]) == (args[0], args[1])
    elif command.program == "vir-demo":
        import vir.app.loading
        import vir.app.ui
        from vir.cli import demo as demo_cli

        class FakeApp:
            def queue(self, **kwargs):
                return self

            def launch(self, **kwargs):
                seen.update(launch=kwargs)

        monkeypatch.setattr(vir.app.loading, "load_chat_model", lambda path, **kw: seen.update(run_dir=path, **kw))
        monkeypatch.setattr(vir.app.ui, "build_app", lambda engine, **kw: FakeApp())
        monkeypatch.setattr(vir.app.ui, "allowed_paths", lambda engine: [])
        demo_cli.main(args)
        assert seen["run_dir"] == args[0]
        if "--port" in args:
            assert seen["launch"]["server_port"] == int(args[args.index("--port") + 1])
    elif command.program == "vir-eval":
        def fake_evaluate_run(run_dir, **kwargs):
            seen.update(run_dir=run_dir, **kwargs)
            return {"accuracy": 0.0, "blind_accuracy": 0.0, "n": 0, "per_type": {}}

        monkeypatch.setattr(eval_cli, "evaluate_run", fake_evaluate_run)
        eval_cli.main(args)
        assert seen["run_dir"] == args[0] and seen["data_path"] == args[args.index("--data") + 1]
    else:
        class FakeSession:
            def __init__(self, *a, **k):
                seen["max_new_tokens"] = a[4] if len(a) > 4 else k.get("max_new_tokens")

            def reset(self, images=()):
                seen["images"] = list(images)

            def ask(self, prompt):
                seen["prompt"] = prompt
                return "an answer"

        monkeypatch.setattr(chat, "load_run", lambda run_dir: seen.update(run_dir=run_dir) or (None,) * 4)
        monkeypatch.setattr(chat, "open_user_image", lambda path: f"image:{path}")
        monkeypatch.setattr(chat, "ChatSession", FakeSession)
        chat.main(args)
        images = [f"image:{args[k + 1]}" for k, arg in enumerate(args) if arg == "--image"]
        assert seen["run_dir"] == args[0] and seen["images"] == images and images
        assert seen["prompt"] == args[args.index("--prompt") + 1]
        assert "an answer" in capsys.readouterr().out
