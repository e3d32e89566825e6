"""`vir-chat RUN_DIR --image PATH --prompt TEXT` for one answer, or `vir-chat RUN_DIR [--image PATH]` for an
interactive session (commands: `/image PATH [PATH ...]` switches images, `/reset` clears history, `/quit`).
`--image` may be given several times: the images go, in order, in front of the first question."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import Sequence

from PIL import Image

from vir.data.conversation import Message, tag_images
from vir.data.images import open_user_image
from vir.inference.generate import Query, generate_answers
from vir.models.checkpoint import load_run
from vir.utils.errors import UserError


class ChatSession:
    """Multi-turn chat state: the images go in front of the first user turn, history is kept."""

    def __init__(self, model, tokenizer, image_processor, run_cfg, max_new_tokens: int = 64):
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.run_cfg = run_cfg
        self.max_new_tokens = max_new_tokens
        self.reset()

    def reset(self, images: Sequence[Image.Image] = ()) -> None:
        self.images = list(images)
        self.messages: list[Message] = []

    def ask(self, prompt: str) -> str:
        if not self.messages:  # the tag this run was trained with, one per image
            prompt = tag_images(prompt, len(self.images), self.run_cfg.model.image_token)
        self.messages.append(Message("user", prompt))
        data = self.run_cfg.data
        answer = generate_answers(self.model, self.tokenizer, self.image_processor,
                                  [Query(list(self.messages), list(self.images))],
                                  template=data.template, image_aspect_ratio=data.image_aspect_ratio,
                                  system_prompt=data.system_prompt, max_new_tokens=self.max_new_tokens)[0]
        self.messages.append(Message("assistant", answer))
        return answer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="vir-chat", description=__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="an image for the first question; repeat for several, in order")
    parser.add_argument("--prompt", default=None, help="answer once and exit")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        model, tokenizer, image_processor, run_cfg = load_run(args.run_dir)
        session = ChatSession(model, tokenizer, image_processor, run_cfg, args.max_new_tokens)
        session.reset([open_user_image(path) for path in args.image])
    except (FileNotFoundError, ValueError, UserError) as err:
        print(f"vir-chat: {err}", file=sys.stderr)
        sys.exit(2)
    if args.prompt is not None:
        print(session.ask(args.prompt))
        return
    print("vir-chat: type a message; /image PATH [PATH ...], /reset, /quit")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            continue
        if line == "/quit":
            break
        if line == "/reset":
            session.reset(session.images)
        elif line.startswith("/image "):
            try:
                session.reset([open_user_image(path) for path in shlex.split(line)[1:]])
            except UserError as err:  # a bad image costs a message, never the session
                print(f"error: {err}")
        else:
            print(f"assistant> {session.ask(line)}", flush=True)


if __name__ == "__main__":
    main()
