"""The Gradio page: a chat with image uploads beside the run's curves, sample grids and per-type metrics.

Every handler turns a `ChatInputError` (or any other failure) into a line in the page's status box
(`#status`), so bad input costs a message, never the server. The status box reads `Done ...` once an answer
has finished streaming.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

import gradio as gr

from vir.app import run_info
from vir.app.chat import ChatEngine, ChatInputError, Sampling, Turn, open_images

logger = logging.getLogger(__name__)

READY = "Ready: upload one or more images (optional), type a question, press Send."


def _files(value) -> List[str]:
    if not value:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    return [str(getattr(item, "name", None) or getattr(item, "path", None) or item) for item in items]


def _display(turns: List[Turn], partial: Optional[str] = None) -> list:
    """The Chatbot's messages: each turn's images (thumbnails of the uploaded files), its text, its answer;
    `partial` stands in for the last turn's answer while it streams."""
    rows = []
    for k, turn in enumerate(turns):
        rows.extend({"role": "user", "content": {"path": source}} for source in turn.sources)
        if turn.images and not turn.sources:
            rows.append({"role": "user", "content": f"[{len(turn.images)} image(s)]"})
        rows.append({"role": "user", "content": turn.text})
        answer = partial if k == len(turns) - 1 and partial is not None else turn.answer
        if answer is not None:
            rows.append({"role": "assistant", "content": answer})
    return rows


def _done(turns: List[Turn]) -> str:
    return f"Done ({len(turns)} turn{'s' if len(turns) > 1 else ''})."


def _error(err: Exception) -> str:
    if isinstance(err, ChatInputError):
        return f"**Error:** {err}"
    logger.exception("chat failed")
    return f"**Error:** {type(err).__name__}: {err}"


class Handlers:
    """The page's callbacks over one engine (plain generators: testable without a browser)."""

    def __init__(self, engine: ChatEngine):
        self.engine = engine

    def _stream(self, turns: List[Turn], sampling: Sampling):
        answer = ""
        for answer in self.engine.stream(turns, sampling):
            yield _display(turns, partial=answer)
        turns[-1].answer = answer

    def send(self, question, files, turns, temperature, top_p, max_new_tokens):
        turns = list(turns or [])
        sampling = Sampling(float(temperature), float(top_p), int(max_new_tokens))
        try:
            sources = _files(files)
            try:
                images = open_images(sources, self.engine.cm.image_side)
            except ChatInputError:
                files = None  # the message names the file; the upload box is emptied for the next try
                raise
            turns.append(Turn(str(question or ""), images, sources=sources))
            self.engine.prepare(turns, sampling)  # every input check before the page changes
            yield _display(turns), turns[:-1], "Generating...", question, files
            for shown in self._stream(turns, sampling):
                yield shown, turns[:-1], "Generating...", "", None
            yield _display(turns), turns, _done(turns), "", None
        except Exception as err:  # noqa: BLE001 - a message in the page, the server goes on
            kept = [t for t in turns if t.answer is not None]
            yield _display(kept), kept, _error(err), question, files

    def regenerate(self, turns, temperature, top_p, max_new_tokens):
        turns = list(turns or [])
        if not turns:
            yield [], [], "**Error:** Nothing to regenerate yet."
            return
        last = turns[-1]
        turns[-1] = Turn(last.text, last.images, sources=last.sources)
        sampling = Sampling(float(temperature), float(top_p), int(max_new_tokens))
        try:
            for shown in self._stream(turns, sampling):
                yield shown, turns[:-1], "Generating..."
            yield _display(turns), turns, _done(turns)
        except Exception as err:  # noqa: BLE001
            turns[-1] = last
            yield _display(turns), turns, _error(err)

    @staticmethod
    def clear():
        return [], [], READY, "", None


def build_app(engine: ChatEngine, max_new_tokens: int = 128, title: Optional[str] = None) -> gr.Blocks:
    """The Blocks app for `engine`'s model; the Run tab reads the run's files next to the checkpoint."""
    cm = engine.cm
    handlers = Handlers(engine)
    examples = run_info.example_questions(cm)
    with gr.Blocks(title=title or f"vir-demo: {cm.path.name}", analytics_enabled=False) as app:
        gr.Markdown(run_info.header_markdown(cm), elem_id="header")
        with gr.Tab("Chat"):
            with gr.Row():
                with gr.Column(scale=3):
                    chatbot = gr.Chatbot(label="Conversation", elem_id="chat", height=420, render_markdown=False)
                    question = gr.Textbox(label="Question", placeholder="Ask about the image(s)", elem_id="question",
                                          lines=2)
                    with gr.Row():
                        send = gr.Button("Send", variant="primary", elem_id="send")
                        regenerate = gr.Button("Regenerate", elem_id="regenerate")
                        clear = gr.Button("Clear", elem_id="clear")
                    status = gr.Markdown(READY, elem_id="status")
                with gr.Column(scale=2):
                    files = gr.File(label="Images (one or several)", file_count="multiple", elem_id="images")
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
                    max_new = gr.Slider(1, max(512, max_new_tokens), value=max_new_tokens, step=1,
                                        label="Max new tokens")
            if examples:
                gr.Examples([[[path], text] for path, text in examples], inputs=[files, question],
                            label="Examples from the run's test split")
        with gr.Tab("Run"):
            _run_tab(cm.path)
        turns = gr.State([])
        sampling = [temperature, top_p, max_new]
        send_outputs = [chatbot, turns, status, question, files]
        send.click(handlers.send, [question, files, turns, *sampling], send_outputs)
        question.submit(handlers.send, [question, files, turns, *sampling], send_outputs)
        regenerate.click(handlers.regenerate, [turns, *sampling], [chatbot, turns, status])
        clear.click(handlers.clear, None, send_outputs)
    return app


def _run_tab(path: Path) -> None:
    curves = run_info.curves_image(path)
    grids = run_info.sample_grids(path)
    headers, rows = run_info.metrics_table(path)
    if not (curves or grids or rows):
        gr.Markdown(f"No curves, sample grids or metrics.json next to `{path}`.")
        return
    if rows:
        gr.Markdown("### Test-split accuracy per question type (`metrics.json`)")
        gr.Dataframe(value=rows, headers=headers, interactive=False, elem_id="metrics")
    if curves:
        gr.Image(str(curves), label="Loss curves (curves.png)", interactive=False, elem_id="curves")
    if grids:
        gr.Gallery([(str(p), p.stem) for p in grids], label="Sample grids (samples/)", columns=1,
                   selected_index=len(grids) - 1, elem_id="grids")


def allowed_paths(engine: ChatEngine) -> List[str]:
    """The folders the page may serve files from: the run (curves, grids) and the examples' images."""
    paths = {str(run_info.run_root(engine.cm.path).resolve())}
    paths.update(str(Path(p).resolve().parent) for p, _ in run_info.example_questions(engine.cm))
    return sorted(paths)
