"""`vir-merge RUN_DIR OUT_DIR`: a run (or `checkpoint-N/`) as one stand-alone checkpoint: LoRA folded into the
base (a QLoRA base de-quantised first), projector included, loadable by `vir-eval`, `vir-chat` and `load_run`
without the base directories.
"""

from __future__ import annotations

import argparse
import logging
import sys

from vir.export.merge import merge_run
from vir.utils.errors import UserError


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="vir-merge", description=__doc__)
    parser.add_argument("run_dir", help="a run directory or one of its checkpoint-N/ folders")
    parser.add_argument("out_dir", help="the directory to write: new, empty, or an earlier vir-merge with --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR when it holds an earlier vir-merge")
    parser.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        out = merge_run(args.run_dir, args.out_dir, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    except (UserError, FileNotFoundError) as err:
        print(f"vir-merge: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out} (vir-eval {out}, vir-chat {out})")


if __name__ == "__main__":
    main()
