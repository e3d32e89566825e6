"""An export never mixes with an older one, never writes into its run, and fails in one line: `vir-export` (both
formats) and `vir-merge` go only into a new or empty directory or, with `--overwrite`, over an earlier export of
the same kind, written whole or not at all; a cut weight file stops `vir-chat`, `vir-eval`, `vir-export` and
`vir-merge` with one line naming it."""

from __future__ import annotations

import errno
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_fixtures import lora_run
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from vir.cli import chat, eval as eval_cli, export, merge
from vir.export.destination import EXPORT_MARKER
from vir.models.checkpoint import load_run
from vir.utils.errors import UserError

TOOLS = {"vir-export": export.main, "vir-merge": merge.main, "vir-chat": chat.main, "vir-eval": eval_cli.main}
# Patched in to stop an export after its weights are written, before its processor is.
KILL_AFTER_WEIGHTS = """
import os, signal, sys
from transformers import LlavaProcessor
LlavaProcessor.save_pretrained = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
from vir.cli.export import main
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A private copy of the session's LoRA run (with its checkpoints), which tests here may damage."""
    copy = tmp_path_factory.mktemp("safety") / "run"
    shutil.copytree(lora_run(tmp_path_factory).output_dir, copy)
    return copy


def _call(tool: str, *argv) -> int:
    try:
        TOOLS[tool]([str(a) for a in argv])
    except SystemExit as exit:
        return exit.code
    return 0


def _refusal(capsys, tool: str, *argv) -> str:
    """Run `tool`, expect exit status 2 with one line on stderr (and no traceback); return that line."""
    capsys.readouterr()
    assert _call(tool, *argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"{tool}:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _state(out: Path) -> dict:
    return LlavaForConditionalGeneration.from_pretrained(str(out)).state_dict()


def _no_staging_beside(out: Path) -> None:
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_a_second_export_needs_overwrite_and_then_replaces_the_first_whole(run, tmp_path, capsys):
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert _call("vir-export", run, out) == 0
    assert (out / "model.safetensors").is_file() and (out / EXPORT_MARKER).is_file()
    first = _snapshot(out)

    line = _refusal(capsys, "vir-export", run, out, "--max-shard-size", "100KB")
    assert str(out) in line and "--overwrite" in line
    assert _snapshot(out) == first

    assert _call("vir-export", run, out, "--max-shard-size", "100KB", "--overwrite") == 0
    assert _call("vir-export", run, fresh, "--max-shard-size", "100KB") == 0
    assert not (out / "model.safetensors").exists()
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in fresh.glob("*.safetensors"))
    assert len(list(out.glob("model-*.safetensors"))) > 1
    theirs, ours = _state(fresh), _state(out)
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    _no_staging_beside(out)


def test_merge_output_is_replaced_only_by_a_merge_and_stays_loadable(run, tmp_path, capsys):
    out = tmp_path / "merged"
    assert _call("vir-merge", run, out) == 0
    assert _call("vir-merge", run, out, "--overwrite") == 0
    load_run(out, device="cpu")
    merged = _snapshot(out)
    line = _refusal(capsys, "vir-export", run, out, "--format", "llava", "--overwrite")
    assert str(out) in line and "vir-merge" in line
    assert _snapshot(out) == merged


@pytest.mark.parametrize("tool", [("vir-export",), ("vir-export", "--format", "llava"), ("vir-merge",)])
def test_a_directory_of_other_files_is_refused_and_left_untouched(tool, run, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"someone else's")
    (out / "notes.txt").write_text("keep me")
    line = _refusal(capsys, tool[0], run, out, *tool[1:], "--overwrite")
    assert str(out) in line and "not empty" in line
    assert _snapshot(out) == {"model.safetensors": hashlib.sha256(b"someone else's").hexdigest(),
                              "notes.txt": hashlib.sha256(b"keep me").hexdigest()}


def test_an_existing_empty_directory_takes_an_export(run, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert _call("vir-export", run, out, "--format", "llava") == 0
    assert (out / "vision_tower" / "config.json").is_file() and (out / EXPORT_MARKER).is_file()
    _no_staging_beside(out)


@pytest.mark.parametrize("tool", ["vir-export", "vir-merge"])
def test_a_checkpoint_exported_into_its_own_run_is_refused_and_the_run_still_loads(tool, run, capsys):
    before = _snapshot(run)
    for extra in ((), ("--overwrite",)):
        line = _refusal(capsys, tool, run / "checkpoint-2", run, *extra)
        assert f"the output directory {run} is the run {run}" in line
    assert _snapshot(run) == before
    load_run(run, device="cpu")


@pytest.mark.parametrize("where", ["inside the run", "inside its checkpoint", "around the run"])
def test_an_export_inside_the_run_or_around_it_is_refused(where, run, capsys):
    source, out = {"inside the run": (run, run / "exports" / "hf"),
                   "inside its checkpoint": (run / "checkpoint-2", run / "exports" / "hf"),
                   "around the run": (run / "checkpoint-2", run.parent)}[where]
    before = _snapshot(run.parent)
    line = _refusal(capsys, "vir-export", source, out, "--overwrite")
    assert str(out) in line and "choose a directory outside the run" in line
    assert _snapshot(run.parent) == before and not (run / "exports").exists()


def test_a_kill_mid_export_leaves_nothing_at_out(run, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", KILL_AFTER_WEIGHTS, str(run), str(out)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-3000:]
    assert not out.exists()
    with pytest.raises(OSError):
        LlavaForConditionalGeneration.from_pretrained(str(out))
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".out.partial-")  # hidden, beside OUT
    assert _call("vir-export", run, out) == 0  # and it does not stand in the way of the next export


@pytest.mark.parametrize("failure", ["disk full", "Ctrl-C"])
def test_a_failure_mid_overwrite_keeps_the_earlier_export_whole(failure, run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert _call("vir-export", run, out) == 0
    earlier = _snapshot(out)

    def fail(*args, **kwargs):
        if failure == "Ctrl-C":
            raise KeyboardInterrupt
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(LlavaProcessor, "save_pretrained", fail)
    argv = (run, out, "--max-shard-size", "100KB", "--overwrite")
    if failure == "Ctrl-C":
        with pytest.raises(KeyboardInterrupt):
            _call("vir-export", *argv)
    else:
        line = _refusal(capsys, "vir-export", *argv)
        assert line.startswith(f"vir-export: could not write {out}: No space left on device")
        assert "earlier export there is unchanged" in line
    assert _snapshot(out) == earlier
    _no_staging_beside(out)


@pytest.mark.parametrize("tool", [("vir-export",), ("vir-merge",)])
def test_a_full_disk_fails_in_one_line_and_leaves_nothing(tool, run, tmp_path, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    # 128 KiB: smaller than the tiny export (about 370 KB), so the weights cannot fit.
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        out = disk / "out"
        line = _refusal(capsys, tool[0], run, out, *tool[1:])
        assert line.startswith(f"{tool[0]}: could not write {out}: No space left on device")
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "mm_projector.bin"])
def test_a_truncated_weight_file_stops_every_tool_in_one_line_naming_it(name, run, tmp_path, capsys):
    damaged = tmp_path / "run"
    shutil.copytree(run, damaged, ignore=shutil.ignore_patterns("checkpoint-*"))
    weights = damaged / name
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_run(damaged, device="cpu")
    for tool, *extra in (("vir-chat", "--prompt", "What colour?"), ("vir-eval", "--limit", "2"),
                         ("vir-export", tmp_path / "hf"), ("vir-merge", tmp_path / "merged")):
        line = _refusal(capsys, tool, damaged, *extra)
        assert f"{weights} is truncated or corrupt" in line and "earlier checkpoint" in line
    assert not (tmp_path / "hf").exists() and not (tmp_path / "merged").exists()


@pytest.mark.parametrize("tool", ["vir-export", "vir-merge"])
def test_an_output_that_cannot_be_created_is_refused_before_any_weight_loads(tool, run, tmp_path, capsys, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the run was loaded before the output directory was checked")

    monkeypatch.setattr("vir.export.hf_llava.load_run", no_load)
    monkeypatch.setattr("vir.export.merge.load_run", no_load)
    (tmp_path / "README.md").write_text("a file")
    line = _refusal(capsys, tool, run, tmp_path / "README.md" / "sub")
    assert f"{tmp_path / 'README.md'} is a file, not a directory" in line


def test_an_earlier_export_moved_aside_by_a_killed_swap_is_not_called_safe_to_delete(run, tmp_path, caplog):
    out = tmp_path / "exported"
    (tmp_path / ".exported.partial-1").mkdir()  # a killed export's staging: safe to delete
    (tmp_path / ".exported.partial-2.replaced").mkdir()  # killed between publish's two renames: the only copy
    assert _call("vir-export", run, out) == 0
    assert "safe to delete: " + str(tmp_path / ".exported.partial-1") in caplog.text
    assert f"its only copy: move it back to {out}" in caplog.text
    assert ".partial-2.replaced" not in caplog.text.split("safe to delete")[1].split("\n")[0]
