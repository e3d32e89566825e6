#!/bin/bash
# Work for a lent GPU. `run`: sweep variants of the LLM base in text, each one `probe_text_base.py --device
# cuda` process, all in parallel, with the CPU recipe's steps and batch (steps, not seconds, are what
# transfer). `train` / `trains`: whole `vir-train` runs (experiment=synthetic_gpu), one or two at once.
#
#   here:  research/probes/gpu_sweep.sh pack     # .gpu_deps/: the pure-Python packages the GPU image lacks
#                                           # (hydra, omegaconf, antlr4) or has at other versions
#                                           # (transformers, peft, huggingface_hub and its http stack)
#   there: research/probes/gpu_sweep.sh run FILE # FILE: one variant a line, "name probe-args..."; the
#                                           # tokenizer must be at runs/local_debug/data/tokenizer
#   there: research/probes/gpu_sweep.sh train [OVERRIDES]  # one whole `vir-train` (experiment=synthetic_gpu unless
#                                           # OVERRIDES name another) in runs/gpu_train, stopped after LIMIT
#                                           # seconds; its log, metrics and bases land in $OUT
#   there: research/probes/gpu_sweep.sh trains FILE  # several at once, one a line "name overrides..." (in
#                                           # runs/gpu_NAME); $OUT gets NAME.log, NAME-metrics.json,
#                                           # NAME-base.json (the LLM base's history) and NAME-bases.tgz
#                                           # (the trained bases), 2 variants at most (8 files come back)
#
#   there: research/probes/gpu_sweep.sh bases [OVERRIDES]  # the bases of experiment=synthetic_gpu alone
#                                           # (build_bases.py), stopped after LIMIT seconds; $OUT gets
#                                           # bases.log, bases-base.json and bases-bases.tgz
#
# SWEEP_DEVICE=cpu runs the same probes here (a check of the script). With the device tool: carry
# [".gpu_deps", "runs/local_debug/data/tokenizer"] (FILE travels if tracked) and run
# `LIMIT=360 bash research/probes/gpu_sweep.sh run FILE`; each probe is stopped after LIMIT seconds, and
# $OUT/sweep.txt holds every variant's "step seconds {accuracy by type}" lines. Variant files so far:
# gpu_sweep_sizes.txt (model sizes, 2026-11-26), gpu_sweep_relation.txt (relation, 2026-11-26). Twelve
# processes share one H100 at ~65 ms a step (6 at ~37 ms), so 12 x 5000 steps do not fit in one 10-minute call.
set -u
case "${1:-}" in
pack)
    site=$(.venv/bin/python -c "import site; print(site.getsitepackages()[0])")
    rm -rf .gpu_deps && mkdir -p .gpu_deps
    for package in hydra omegaconf antlr4 peft huggingface_hub httpx2 httpcore2 truststore; do
        cp -r "$site/$package" .gpu_deps/
    done
    # transformers' sources are ~130 MB, over the device tool's 64 MiB a call: they travel compressed.
    tar -C "$site" --exclude=__pycache__ -czf .gpu_deps/transformers.tgz transformers
    # vision_instruct_recipes: vir's own entry points (its recipes and the demo's config section)
    for dist in hydra_core omegaconf antlr4_python3_runtime transformers peft huggingface_hub httpx2 httpcore2 \
        truststore vision_instruct_recipes; do
        cp -r "$site/$dist"-*.dist-info .gpu_deps/  # metadata: transformers checks its dependencies' versions
    done
    find .gpu_deps -name __pycache__ -prune -exec rm -rf {} +
    du -sh .gpu_deps
    ;;
run | train | trains | bases)
    unpacked=$(mktemp -d)
    tar -C "$unpacked" -xzf .gpu_deps/transformers.tgz || exit 1
    export PYTHONPATH=$PWD/src:$unpacked:$PWD/.gpu_deps PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    python3 -c "import torch, transformers, vir.demo.llm_base; print(torch.__version__,
        transformers.__version__, torch.cuda.is_available())" || exit 1
    out=${OUT:-.}
    train_one() {  # name overrides...: one vir-train in runs/gpu_NAME, its log and metrics into $out
        local name=$1 start
        shift
        start=$(date +%s)
        TQDM_MININTERVAL=10 timeout "${LIMIT:-540}" python3 -m vir.cli.train experiment=synthetic_gpu \
            "training.output_dir=runs/gpu_$name" "$@" >"$out/$name.log" 2>&1
        echo "exit $? after $(( $(date +%s) - start )) s" >>"$out/$name.log"
        [ -f "runs/gpu_$name/metrics.json" ] && cp "runs/gpu_$name/metrics.json" "$out/$name-metrics.json"
        [ -f "runs/gpu_$name/bases/llm/pretrain_metrics.json" ] &&
            cp "runs/gpu_$name/bases/llm/pretrain_metrics.json" "$out/$name-base.json"
        # The trained bases (tiny: ~6 MB), so that a GPU's base can be tried in the CPU recipe here.
        [ -d "runs/gpu_$name/bases/llm" ] && tar -C "runs/gpu_$name" -czf "$out/$name-bases.tgz" bases
        tail -8 "$out/$name.log" | sed "s/^/$name: /"
    }
    ;;&
train)
    shift
    train_one train "$@"
    last=$(ls runs/gpu_train/samples/*.png 2>/dev/null | sort -V | tail -1)
    [ -n "$last" ] && cp "$last" "$out/samples.png"
    [ -f runs/gpu_train/curves.png ] && cp runs/gpu_train/curves.png "$out/"
    ;;
bases)
    shift
    start=$(date +%s)
    timeout "${LIMIT:-540}" python3 research/probes/build_bases.py experiment=synthetic_gpu \
        training.output_dir=runs/gpu_bases "$@" >"$out/bases.log" 2>&1
    echo "exit $? after $(( $(date +%s) - start )) s" >>"$out/bases.log"
    [ -f runs/gpu_bases/bases/llm/pretrain_metrics.json ] &&
        cp runs/gpu_bases/bases/llm/pretrain_metrics.json "$out/bases-base.json"
    [ -f runs/gpu_bases/bases/llm/pretrain_metrics.json ] && tar -C runs/gpu_bases -czf "$out/bases-bases.tgz" bases
    tail -4 "$out/bases.log"
    ;;
trains)
    variants=${2:?"usage: $0 trains FILE"}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-6}  # the runs share the machine's 16 cores
    while read -r name args; do
        [ -z "$name" ] || [ "${name:0:1}" = "#" ] && continue
        # shellcheck disable=SC2086
        train_one "$name" $args &
    done <"$variants"
    wait
    ;;
run)
    variants=${2:?"usage: $0 run FILE"}
    export OMP_NUM_THREADS=1
    logs=$(mktemp -d)
    while read -r name args; do
        [ -z "$name" ] || [ "${name:0:1}" = "#" ] && continue
        # shellcheck disable=SC2086
        timeout "${LIMIT:-360}" python3 research/probes/probe_text_base.py --device "${SWEEP_DEVICE:-cuda}" $args \
            >"$logs/$name.json" 2>"$logs/$name.log" &
    done <"$variants"
    wait
    for log in "$logs"/*.log; do
        echo "== $(basename "$log" .log)"
        grep -E "llm step|Error" "$log" | sed -E 's/.*llm step ([0-9]+) \(([0-9]+)s\).*accuracy.: (\{[^}]*\}).*/\1 \2s \3/'
    done | tee "${OUT:-.}/sweep.txt"
    ;;
*)
    echo "usage: $0 pack | run FILE | train [OVERRIDES] | trains FILE | bases [OVERRIDES]" >&2
    exit 2
    ;;
esac
