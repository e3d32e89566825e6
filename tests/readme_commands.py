"""The commands README.md prints, parsed so tests can run them (plain functions: import them).

A command is a line of a ```bash fenced block (backslash continuations joined) that starts with `vir-`;
`inline_commands` also reads `vir-...` commands written inline in backticks in the prose (README section 5).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

README = Path(__file__).resolve().parents[1] / "README.md"
CONSOLE_SCRIPTS = ("vir-train", "vir-validate", "vir-eval", "vir-chat", "vir-plan", "vir-export", "vir-merge",
                   "vir-demo")
HYDRA_PROGRAMS = ("vir-train", "vir-validate", "vir-plan")  # Hydra overrides; the others take argparse flags

_FENCE = re.compile(r"^```[ \t]*bash[ \t]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
_INLINE = re.compile(r"`(vir-[a-z]+(?: [^`]*)?)`")


@dataclass(frozen=True)
class Command:
    """One README command: `argv[0]` is the program, `line` the joined text as printed."""

    line: str
    argv: Tuple[str, ...]

    @property
    def program(self) -> str:
        return self.argv[0]

    @property
    def args(self) -> List[str]:
        return list(self.argv[1:])

    def overrides(self) -> Dict[str, str]:
        """`{key: value}` of every Hydra `key=value` argument (group choices included), in order."""
        return dict(arg.split("=", 1) for arg in self.args if "=" in arg and not arg.startswith("-"))

    def __str__(self) -> str:
        return self.line


def bash_blocks(text: str) -> List[str]:
    """The bodies of every ```bash fenced block."""
    return [match.group(1) for match in _FENCE.finditer(text)]


def joined_lines(block: str) -> List[str]:
    """The block's lines with backslash-continued lines joined into one."""
    lines, current = [], ""
    for raw in block.splitlines():
        stripped = raw.rstrip()
        if stripped.endswith("\\"):
            current += stripped[:-1].strip() + " "
            continue
        lines.append((current + stripped.strip()).strip())
        current = ""
    if current.strip():
        lines.append(current.strip())
    return lines


def readme_commands(path: Path = README) -> List[Command]:
    """Every `vir-...` command line of the README's ```bash blocks, split as a shell would split it."""
    commands = []
    for block in bash_blocks(path.read_text(encoding="utf-8")):
        for line in joined_lines(block):
            if line.startswith("vir-"):  # a bare `...` stands for "your other overrides": not an argument
                argv = tuple(arg for arg in shlex.split(line, comments=True) if arg != "...")
                commands.append(Command(line, argv))
    return commands


def inline_commands(path: Path = README) -> List[Command]:
    """`vir-...` commands written inline in backticks (with arguments, none elided with `...`)."""
    commands = []
    for match in _INLINE.finditer(path.read_text(encoding="utf-8")):
        line = match.group(1).strip()
        if " " in line and "..." not in line:
            commands.append(Command(line, tuple(shlex.split(line))))
    return commands


def command_for(commands: List[Command], program: str, **choices: str) -> Command:
    """The one `program` command whose overrides include every `key=value` of `choices` (dots as `__`)."""
    wanted = {key.replace("__", "."): value for key, value in choices.items()}
    found = [c for c in commands if c.program == program
             and all(c.overrides().get(k) == v for k, v in wanted.items())]
    assert len(found) == 1, f"expected one README `{program}` command with {wanted}, found {len(found)}"
    return found[0]


def localize(value: str, root: Path) -> str:
    """A README placeholder path (absolute, or under `runs/`) moved under `root`; any other value unchanged."""
    if value.startswith("/"):
        return str(root / value.lstrip("/"))
    if value.startswith("runs/"):
        return str(root / value)
    return value


def localized_args(command: Command, root: Path) -> List[str]:
    """The command's arguments with every placeholder path moved under `root` (`key=value` and flag values)."""
    out = []
    for arg in command.args:
        if "=" in arg and not arg.startswith("-"):
            key, value = arg.split("=", 1)
            out.append(f"{key}={localize(value, root)}")
        else:
            out.append(localize(arg, root))
    return out
