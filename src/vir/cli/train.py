"""`vir-train`: one training run of a user's model on a user's data, or any experiment, with Hydra overrides.

    vir-train model.llm.path=... model.vision_tower.path=... data.train_path=... data.image_folder=...
    vir-train training=stage1 data.template=plain ...         # LLaVA's stage 1 (projector alignment)
    vir-train experiment=local_debug                          # the embedded demo (what `make train` runs)
    vir-train --cfg job                                       # print the composed config
    torchrun --standalone --nproc_per_node 2 -m vir.cli.train ...   # data-parallel
"""

from __future__ import annotations

import contextlib
import json
import time
from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path

from omegaconf import DictConfig

from vir.inference.evaluate import format_metrics
from vir.utils.config import ConfigError, cli_entry

RECIPE_ENTRY_POINTS = "vir.recipes"  # recipe.name -> a module with `run(cfg) -> dict` (pyproject.toml)


def recipes() -> dict:
    """`{recipe.name: module path}` of every installed recipe."""
    return {ep.name: ep.value for ep in entry_points(group=RECIPE_ENTRY_POINTS)}


def run(cfg: DictConfig) -> int:
    known = recipes()
    if cfg.recipe.name not in known:
        raise ConfigError(f"recipe.name={cfg.recipe.name!r} is not one of {', '.join(sorted(known))}")
    # Imported here, after cli_entry quietened bitsandbytes (which the pre-flight's imports load).
    from vir.training.distributed import run_state
    from vir.training.preflight import check_output_dir
    from vir.training.run_lock import run_dir_lock

    start = time.time()
    output_dir = cfg.training.output_dir
    main_process = run_state().is_main_process
    check_output_dir(output_dir, probe=main_process)
    # The recipe's whole run directory (a demo's data and stages too); run_training takes it again per stage.
    with run_dir_lock(Path(output_dir)) if main_process else contextlib.nullcontext():
        result = import_module(known[cfg.recipe.name]).run(cfg)
    if not result:  # a torchrun process other than the main one: the main one reports
        return 0
    print(f"\nrun dir: {cfg.training.output_dir}  ({time.time() - start:.0f} s)")
    if "per_type" in result:
        print(format_metrics(result))
        blind = result.get("blind_accuracy")
        print(f"test accuracy: {result['accuracy']:.3f}"
              + (f" (blind baseline {blind:.3f})" if blind is not None else ""))
    else:
        print(json.dumps(result, indent=2))
    return 0


main = cli_entry(run)

if __name__ == "__main__":
    main()
