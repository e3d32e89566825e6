"""`vir-export RUN_DIR OUT_DIR`: a run (or `checkpoint-N/`) as a transformers `LlavaForConditionalGeneration`
directory that plain transformers, vLLM and SGLang load: LoRA merged (a QLoRA run into its de-quantised base),
safetensors sharded past `--max-shard-size`, the processor with the training chat template, and a model card.

    vir-export runs/my_run exports/my_run
    vir-export runs/my_run exports/my_run_adapter --no-merge     # base + projector, adapter/ beside it
    vir-export runs/my_run exports/my_run_llava --format llava   # LLaVA's own layout (llava_llama, mm_projector.bin)
    vir-export runs/my_run exports/llava-x --format llava --vision-tower-id openai/clip-vit-large-patch14-336
    vir-export runs/my_run exports/my_run --overwrite            # replace an earlier export of the same format

OUT_DIR is written whole or not at all (staged beside it, then renamed into place).
"""

from __future__ import annotations

import argparse
import logging
import sys

from vir.export.hf_llava import DEFAULT_MAX_SHARD_SIZE, export_hf_llava
from vir.export.merge import export_llava_original
from vir.utils.config_schema import DTYPE_NAMES
from vir.utils.errors import UserError


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="vir-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run directory or one of its checkpoint-N/ folders")
    parser.add_argument("out_dir", help="the directory to write: new, empty, or an earlier export with --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT_DIR when it holds an earlier vir-export of the same --format")
    parser.add_argument("--format", default="hf", choices=["hf", "llava"],
                        help="hf: transformers' LlavaForConditionalGeneration (vLLM, SGLang); llava: LLaVA's original "
                             "llava_llama layout with mm_projector.bin and the tower in vision_tower/")
    parser.add_argument("--vision-tower-id", default=None, metavar="HUB_ID",
                        help="--format llava: write this hub id (e.g. openai/clip-vit-large-patch14-336) as "
                             "mm_vision_tower, for a run whose frozen tower is that checkpoint; by default it names "
                             "the copy in OUT_DIR/vision_tower, relative to OUT_DIR")
    parser.add_argument("--no-merge", action="store_true", help="keep the LoRA adapter apart, in OUT_DIR/adapter/")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help="e.g. 5GB (the default), 500MB")
    parser.add_argument("--dtype", default=None, choices=DTYPE_NAMES,
                        help="cast the weights (default: keep the run's dtype)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if args.format == "llava" and (args.no_merge or args.dtype):
        parser.error("--format llava writes merged weights in the run's dtype (no --no-merge, no --dtype)")
    if args.vision_tower_id and args.format != "llava":
        parser.error("--vision-tower-id is for --format llava (the hf format keeps its tower in its weights)")
    try:
        if args.format == "llava":
            out = export_llava_original(args.run_dir, args.out_dir, max_shard_size=args.max_shard_size,
                                        overwrite=args.overwrite, vision_tower_id=args.vision_tower_id)
        else:
            out = export_hf_llava(args.run_dir, args.out_dir, merge=not args.no_merge,
                                  max_shard_size=args.max_shard_size, dtype=args.dtype, overwrite=args.overwrite)
    except (UserError, FileNotFoundError) as err:
        print(f"vir-export: {err}", file=sys.stderr)
        sys.exit(2)
    kind = "LLaVA's llava_llama layout" if args.format == "llava" else "LlavaForConditionalGeneration"
    print(f"wrote {out} ({kind}; see {out}/README.md)")


if __name__ == "__main__":
    main()
