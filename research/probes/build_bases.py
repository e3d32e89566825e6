"""Build an experiment's demo bases alone (no stages): the synthetic data, then the CLIP tower and the Llama.

    python research/probes/build_bases.py experiment=synthetic_gpu [OVERRIDES]

What `gpu_sweep.sh bases` runs on a lent GPU to rebuild the shipped bases (`experiment=local_debug` copies
them from `src/vir/demo/assets/bases/local_debug/`); the stages then run here on the CPU with
`demo.bases.source=` pointing at the result. Prints the seconds each part took and the LLM base's final
held-out accuracy in text.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from vir.demo.bases import LLM_SUBDIR, build_bases
from vir.demo.common import PRETRAIN_METRICS_FILE
from vir.demo.synthetic import generate
from vir.training.distributed import main_process_first, run_state
from vir.utils.config import compose_config


def main(overrides: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = compose_config(overrides)
    start = time.time()
    with main_process_first():
        paths = generate(Path(cfg.training.output_dir) / "data", cfg.demo.synthetic)
    data_seconds = time.time() - start
    build_bases(cfg.demo.bases.output_dir, cfg, tokenizer_dir=paths.tokenizer)
    if run_state().is_main_process:
        metrics = json.loads((Path(cfg.demo.bases.output_dir) / LLM_SUBDIR / PRETRAIN_METRICS_FILE).read_text())
        print(json.dumps({"data_seconds": round(data_seconds, 1), "bases_seconds": round(time.time() - start - data_seconds, 1),
                          "llm_train_seconds": metrics["train_seconds"], "llm_final": metrics["final"]}))


if __name__ == "__main__":
    main(sys.argv[1:])
