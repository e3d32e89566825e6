"""`vir-train`: any experiment, any Hydra override.

    vir-train                                   # the embedded default (experiment=local_debug)
    vir-train experiment=local_debug training.output_dir=runs/mine
    vir-train recipe.name=single model=llama3_8b_clip_l336 model.llm.path=... data.train_path=...
    vir-train --cfg job                         # print the composed config
    torchrun --standalone --nproc_per_node 2 -m vir.cli.train experiment=local_debug   # data-parallel
"""

from __future__ import annotations

import importlib
import json
import time

from omegaconf import DictConfig

from vir.inference.evaluate import format_metrics
from vir.utils.config import cli_entry

# recipe.name -> module with `run(cfg) -> dict`
RECIPES = {"single": "vir.recipes.finetune", "synthetic_llava": "vir.recipes.synthetic_llava"}


def run(cfg: DictConfig) -> int:
    if cfg.recipe.name not in RECIPES:
        raise SystemExit(f"recipe.name={cfg.recipe.name!r} is not one of {', '.join(RECIPES)}")
    start = time.time()
    result = importlib.import_module(RECIPES[cfg.recipe.name]).run(cfg)
    if not result:  # a torchrun process other than the main one: the main one reports
        return 0
    print(f"\nrun dir: {cfg.training.output_dir}  ({time.time() - start:.0f} s)")
    if "per_type" in result:
        print(format_metrics(result))
        blind = result.get("blind_accuracy", float("nan"))
        print(f"test accuracy: {result['accuracy']:.3f} (blind baseline {blind:.3f})")
    else:
        print(json.dumps(result, indent=2))
    return 0


main = cli_entry(run)

if __name__ == "__main__":
    main()
