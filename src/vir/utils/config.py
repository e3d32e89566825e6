"""Composing and checking the shipped Hydra config tree (CLI entry points, tests, notebooks)."""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vir.utils.config_schema import register_configs, schema
from vir.utils.errors import STORAGE_ERRNOS, UserError

CONFIG_MODULE = "vir.conf"
CONFIG_NAME = "config"


class ConfigError(UserError):
    """A config the user wrote is wrong; the message names the key and what to do."""


def check_config(cfg: DictConfig) -> DictConfig:
    """Merge `cfg` onto the typed schema so keys added with `+key=...` are checked too.

    Returns the merged (typed, struct-mode) config; raises ConfigError naming the full key otherwise.
    """
    try:
        # Re-merge a plain copy: a composed config lets `+key=...` through even onto typed nodes.
        plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
        merged = OmegaConf.merge(OmegaConf.structured(schema()), plain)
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err)) from err
    OmegaConf.set_struct(merged, True)
    return merged


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose `vir.conf/config.yaml` with command-line style `overrides` and check it against the schema."""
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = compose(config_name=CONFIG_NAME, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_describe(err)) from err
    finally:
        GlobalHydra.instance().clear()
    return check_config(cfg)


def _describe(err: Exception) -> str:
    full_key = getattr(err, "full_key", None)
    msg = str(err).strip()
    if err.__cause__ is not None and str(err.__cause__).strip() not in msg:
        msg = f"{msg}: {str(err.__cause__).strip()}"
    if full_key and full_key not in msg:
        msg = f"{msg} (key: {full_key})"
    return f"invalid config: {msg}\nRun with `--cfg job` to print the composed config and its keys."


def cli_entry(run: Callable[[DictConfig], int]) -> Callable[[], None]:
    """Turn `run(cfg) -> exit status` into a console-script `main()` that takes Hydra overrides.

    `--cfg job` prints the composed config; config errors exit with status 2 and a one-paragraph message
    instead of a traceback.
    """

    @functools.wraps(run)
    def main() -> None:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        # bitsandbytes (imported by peft) warns at import that its optional CPU kernels from a hub are absent.
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        args = sys.argv[1:]
        print_cfg = False
        if "--cfg" in args:
            i = args.index("--cfg")
            print_cfg = True
            del args[i : i + 2]
        try:
            cfg = compose_config(args)
        except ConfigError as err:
            print(err, file=sys.stderr)
            sys.exit(2)
        if print_cfg:
            print(OmegaConf.to_yaml(cfg, resolve=True))
            sys.exit(0)
        try:
            status = run(cfg)
        except (UserError, FileNotFoundError) as err:  # what the user can fix: the message, no traceback
            print(f"{Path(sys.argv[0]).name}: {err}", file=sys.stderr)
            sys.exit(2)
        except OSError as err:  # out of disk, over quota, a read-only mount: the path and the reason
            if err.errno not in STORAGE_ERRNOS:
                raise
            print(f"{Path(sys.argv[0]).name}: cannot write {err.filename or 'a file'}: {err.strerror}; free space "
                  "(or make it writable) and re-run", file=sys.stderr)
            sys.exit(2)
        sys.exit(status)

    return main
