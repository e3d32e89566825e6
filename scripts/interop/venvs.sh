#!/bin/sh
# The virtualenvs `make interop-check` runs the other stacks in, built once from PyPI and cached outside the
# repository under $VIR_INTEROP_HOME (default ~/.cache/vir-interop); a finished one is reused, a half-built one
# (no .installed stamp) is rebuilt. Several GB in all: LLaVA's package pins torch 2.0.1, whose PyPI wheel brings
# CUDA libraries (it runs on the CPU all the same).
#   llava-1.2.2.post1   haotian-liu/LLaVA's `llava-torch` 1.2.2.post1 at the versions its wheel pins
#                       (torch 2.0.1, transformers 4.36.2, tokenizers 0.15.0, accelerate 0.21.0)
#   transformers-4.57.6 the newest transformers 4.x release, beside the CPU torch this project uses
set -eu
home=${VIR_INTEROP_HOME:-$HOME/.cache/vir-interop}
python=${PYTHON:-python3}
mkdir -p "$home"

build() {
    name=$1; shift
    dir=$home/$name
    if [ -f "$dir/.installed" ]; then return 0; fi
    echo "interop-check: building $dir (once; several minutes)" >&2
    rm -rf "$dir"
    "$python" -m venv "$dir"
    if ! "$dir/bin/pip" install -q "$@" > "$home/$name.log" 2>&1; then
        grep -v '^WARNING: Location' "$home/$name.log" | tail -n 20 >&2
        echo "interop-check: building $dir failed (log: $home/$name.log)" >&2
        exit 1
    fi
    touch "$dir/.installed"
}

build llava-1.2.2.post1 llava-torch==1.2.2.post1
build transformers-4.57.6 torch==2.13.0 transformers==4.57.6 safetensors pillow numpy
echo "$home"
