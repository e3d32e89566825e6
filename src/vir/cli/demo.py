"""`vir-demo RUN_DIR [--port N] [--host H]`: a web page to talk to a trained model (Gradio), beside its loss
curves, sample grids and per-type metrics.

RUN_DIR is a run directory (or one of its checkpoint-N/ folders), a vir-merge checkpoint or a vir-export
directory. Answers are greedy (temperature 0, as vir-eval decodes) until the page's sliders say otherwise.

    vir-demo runs/local_debug --port 7860
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from vir.utils.config_schema import DTYPE_NAMES
from vir.utils.errors import UserError


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="vir-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run directory, checkpoint-N/, vir-merge or vir-export output")
    parser.add_argument("--port", type=int, default=7860, help="the port to serve on (default 7860)")
    parser.add_argument("--host", default="127.0.0.1", help="the address to bind (default 127.0.0.1; 0.0.0.0: all)")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when there is one")
    parser.add_argument("--dtype", default="float32", choices=DTYPE_NAMES,
                        help="weights' dtype, as model.llm.dtype names it (default float32)")
    parser.add_argument("--load-in-4bit", action="store_true", help="the LLM in 4-bit nf4 (bitsandbytes)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="the slider's starting value")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port {args.port}: not a TCP port")
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
    from vir.app.chat import ChatEngine
    from vir.app.loading import load_chat_model

    try:
        engine = ChatEngine(load_chat_model(args.run_dir, device=args.device, dtype=args.dtype,
                                            load_in_4bit=args.load_in_4bit))
    except (UserError, FileNotFoundError, OSError) as err:
        print(f"vir-demo: {err}", file=sys.stderr)
        sys.exit(2)
    from vir.app.ui import allowed_paths, build_app

    app = build_app(engine, max_new_tokens=args.max_new_tokens)
    print(f"vir-demo: serving {args.run_dir} on http://{args.host}:{args.port}", flush=True)
    try:
        app.queue(default_concurrency_limit=1).launch(
            server_name=args.host, server_port=args.port, show_error=True, allowed_paths=allowed_paths(engine),
            max_file_size="100mb", ssr_mode=False, footer_links=[], quiet=True)
    except OSError as err:  # the port is taken, the address cannot be bound
        print(f"vir-demo: cannot serve on {args.host}:{args.port}: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
