"""`vir-eval RUN_DIR [--split test]`: exact-match accuracy of a run, per question type, beside a blind
baseline (images blanked); writes `RUN_DIR/metrics.json` (the test split; other splits
`metrics_<split>.json`, so they never overwrite the run's test figures) and `RUN_DIR/predictions_<split>.jsonl`."""

from __future__ import annotations

import argparse
import logging
import sys

from vir.inference.evaluate import evaluate_run, format_metrics, metrics_file


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="vir-eval", description=__doc__)
    parser.add_argument("run_dir", help="a run directory or one of its checkpoint-N/ folders")
    parser.add_argument("--split", default="test", choices=["train", "eval", "test"])
    parser.add_argument("--data", default=None, help="a LLaVA-format file to score instead of the run's split")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N records")
    parser.add_argument("--no-blind", action="store_true", help="skip the blind (images blanked) baseline")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        metrics = evaluate_run(args.run_dir, split=args.split, data_path=args.data, limit=args.limit,
                               blind=not args.no_blind, max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size)
    except (FileNotFoundError, ValueError) as err:
        print(f"vir-eval: {err}", file=sys.stderr)
        sys.exit(2)
    print(format_metrics(metrics))
    print(f"wrote {args.run_dir}/{metrics_file(args.split, args.data)}")


if __name__ == "__main__":
    main()
