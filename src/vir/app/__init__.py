"""`vir-demo`: a web page to talk to a trained run (Gradio), beside what the run learned.

`loading` opens a run directory, a `vir-merge` checkpoint or a `vir-export` directory as one `ChatModel`;
`chat` is the server-free streaming chat engine over it; `run_info` reads the header, curves, sample grids,
per-type metrics and example questions from the run's own files; `ui` lays out the page.
"""
