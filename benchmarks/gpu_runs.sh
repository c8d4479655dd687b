#!/usr/bin/env bash
# The GPU measurements behind the README's H200 figures, in stages small enough for one 10-minute machine call each.
#
#   bash benchmarks/gpu_runs.sh STAGE OUT_DIR
#
# Stages (each writes STAGE.json / STAGE.log files into OUT_DIR and never stops the next command on a failure):
#   tests     the GPU-marked tests (CUDA graphs, prefill graphs, the Triton kernels, row buffering on CUDA, the
#             trainer's CUDA graphs, a compiled ablation on CUDA)
#   decode    decode-step variants of the 1B shape at batch 1, with kernel tables (benchmarks/decode_variants.py)
#   int8      int8 weight-only decode variants (bf16 first; int8 with and without the fused gate/up kernel, then
#             bf16 and int8 again), kernel tables
#   gemv      each one-row product alone (benchmarks/gemv_micro.py): which kernel and launch setting is fastest
#   fused     the fused decode kernels (q/k/v + RoPE + cache write; RMSNorm + gate/up + SiLU): their GPU tests, then
#             the decode step without and with them in bf16 (six variants, ~8 minutes on a fresh machine)
#   micro     the fused decode kernels alone over their launch settings, against inductor (benchmarks/fused_micro.py,
#             ~2 minutes)
#   route     the products whose inductor tuning spreads the decode step between processes (stacked gate/up and the
#             output head: 276-347 and 115-133 us per step across six processes of one code, 2026-12-02) timed
#             alone over a wide row GEMV sweep (gemv_micro), then the step with exactly the fastest settings routed to
#             the row GEMV kernel (a fixed, untuned kernel) against the default, three fresh processes each
#             (QUANT=int8_weight_only: int8 products and steps instead of bf16; ~9 minutes)
#   int8mm    eager int8 weight-only products of 1/16/64 rows (the prefill's) through llamaforge.kernels.int8_mm over
#             launch settings, against the cast-then-matmul form and bf16 cuBLAS (benchmarks/int8_mm_micro.py, ~1 min)
#   train     training throughput against transformers+compile, with variants and the kernel table
#   final     generate_throughput at batch 1/8/32 and quant_speed --gpu, with transformers in the same run
#
# Extra arguments after OUT_DIR are passed to the stage's script (e.g. more variants for `decode`).
set -uo pipefail
stage=${1:?stage: tests, decode, int8, gemv, fused, micro, route, int8mm, train or final}
out=${2:?output directory}
shift 2
mkdir -p "$out"
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
# DEVICE / SPEC / DTYPE override the decode stages' model (the tests run them on the CPU with the tiny spec)
spec=(--device "${DEVICE:-cuda}" --spec "${SPEC:-llama3.2-1b}" --dtype "${DTYPE:-bfloat16}")
# FRESH=1: decode and int8 variants each compile into an empty inductor cache (decode_variants --fresh-cache)
fresh=()
[ "${FRESH:-0}" = 1 ] && fresh=(--fresh-cache)

case "$stage" in
tests)
    $py -m pytest -q -m gpu --continue-on-collection-errors tests/test_generation.py tests/test_kernels.py \
        tests/test_train.py tests/test_ablate.py "$@" >"$out/tests.log" 2>&1
    tail -n 25 "$out/tests.log"
    ;;
decode)
    # ~65-140 s per variant on an H200 (compilation with coordinate-descent tuning), ~80 s typical: five fit;
    # PHASES=1 adds generate() of 1/2/N tokens per variant (~30 s more each), CALLS=N profiled calls (see below)
    variants=("$@")
    [ ${#variants[@]} -gt 0 ] || variants=(base prefill_graph=0 "attn=flash_decode,splits=4" quant=int8_weight_only
        base)
    phases=()
    [ "${PHASES:-0}" = 1 ] && phases=(--phases)
    # CALLS=N profiles whole generate() calls of 1 and N tokens per variant (decode_variants --call-profile)
    [ -n "${CALLS:-}" ] && phases+=(--call-profile "$CALLS")
    # CODE=1 keeps each variant's inductor-generated kernels (their tuned configs) in OUT_DIR/code/VARIANT.log
    [ "${CODE:-0}" = 1 ] && phases+=(--output-code "$out/code")
    (cd benchmarks && $py decode_variants.py "${spec[@]}" "${variants[@]}" --profile ${phases[@]+"${phases[@]}"} \
        ${fresh[@]+"${fresh[@]}"} --json "$out/decode.json") >"$out/decode.log" 2>&1
    tail -n 12 "$out/decode.log"
    ;;
fused)
    $py -m pytest -q -m gpu tests/test_kernels.py tests/test_generation.py \
        -k "qkv_rope or gate_up or fused or either_stream" >"$out/fused_tests.log" 2>&1
    tail -n 5 "$out/fused_tests.log"
    variants=("$@")
    # int8: `int8` stage with quant=int8_weight_only "quant=int8_weight_only,qkv_rope=1,gate_up=1"
    [ ${#variants[@]} -gt 0 ] || variants=(base qkv_rope=1 gate_up=1 "qkv_rope=1,gate_up=1" base
        "qkv_rope=1,gate_up=1")
    (cd benchmarks && $py decode_variants.py "${spec[@]}" "${variants[@]}" --profile ${fresh[@]+"${fresh[@]}"} \
        --json "$out/fused.json") >"$out/fused.log" 2>&1
    tail -n 10 "$out/fused.log"
    ;;
int8mm)
    (cd benchmarks && $py int8_mm_micro.py --json "$out/int8_mm.json" "$@") >"$out/int8_mm.log" 2>&1
    tail -n 15 "$out/int8_mm.log"
    ;;
int8)
    variants=("$@")
    # bf16 first: the int8/bf16 ratio comes from one run
    # (int8 with the fused gate/up kernel, the default on CUDA, then without it)
    [ ${#variants[@]} -gt 0 ] || variants=(base quant=int8_weight_only "quant=int8_weight_only,gate_up_int8=0" base
        quant=int8_weight_only)
    (cd benchmarks && $py decode_variants.py "${spec[@]}" "${variants[@]}" --profile ${fresh[@]+"${fresh[@]}"} \
        --json "$out/int8.json") \
        >"$out/int8.log" 2>&1
    tail -n 8 "$out/int8.log"
    ;;
gemv)
    # each one-row product of the 1B model alone: cuBLAS, inductor's reduction, the row GEMV kernel's settings
    (cd benchmarks && $py gemv_micro.py --device "${DEVICE:-cuda}" --int8 "$@" --json "$out/gemv.json") \
        >"$out/gemv.log" 2>&1
    tail -n 12 "$out/gemv.log"
    ;;
micro)
    (cd benchmarks && $py fused_micro.py --device "${DEVICE:-cuda}" "$@" --json "$out/fused_micro.json") \
        >"$out/fused_micro.log" 2>&1
    tail -n 6 "$out/fused_micro.log"
    ;;
route)
    # QUANT=METHOD: that quantizer's products and steps; ROUTE=TEXT: skip the sweep and route exactly TEXT (a
    # gemv_route value); ROUNDS=N: processes of each (default 3); extra arguments go to decode_variants
    quant=${QUANT:-}
    kind=(); base=base
    if [ -n "$quant" ]; then kind=(--int8-only); base="quant=$quant"; fi
    route=${ROUTE:-}
    if [ -z "$route" ] && [ "${DEVICE:-cuda}" = cpu ]; then
        echo "route: the row GEMV sweep needs a CUDA GPU; give ROUTE=BYTES/ROWS/K/BLOCK_N/BLOCK_K/WARPS/SPLIT_K[+...]" >&2
        exit 1
    fi
    if [ -z "$route" ]; then
        sweep=(1:2048:4 1:2048:8 2:2048:4 2:2048:8 4:2048:4 4:2048:8 8:2048:8 4:2048:16 8:2048:16 1:1024:4 2:1024:8
            2:1024:4 4:1024:4 8:1024:8 8:512:4 16:1024:8)  # both products have rows of 2,048: no wider steps
        (cd benchmarks && $py gemv_micro.py --device "${DEVICE:-cuda}" --shapes 8192+8192:2048 128256:2048 \
            ${kind[@]+"${kind[@]}"} --sweep "${sweep[@]}" --json "$out/route_gemv.json") >"$out/route_gemv.log" 2>&1
        tail -n 3 "$out/route_gemv.log"
        route=$($py -c 'import json, sys; print(json.load(open(sys.argv[1]))["gemv_route"])' "$out/route_gemv.json")
    fi
    [ -n "$route" ] || { echo "no row GEMV setting to route (gemv_micro timed none: no GPU?)" >&2; exit 1; }
    routed="gemv_route=$route"
    [ "$base" != base ] && routed="$base,$routed"
    pairs=()
    for _ in $(seq "${ROUNDS:-3}"); do pairs+=("$base" "$routed"); done  # ROUNDS: processes of each, alternating
    (cd benchmarks && $py decode_variants.py "${spec[@]}" "${pairs[@]}" --profile --fresh-cache "$@" \
        --json "$out/route.json") >"$out/route.log" 2>&1
    tail -n 6 "$out/route.log"
    ;;
train)
    extra=("$@")
    # llamaforge against transformers+compile; each contender compiles with coordinate-descent tuning (~70-190 s on
    # an H200), so one or two extra variants fit one call, e.g. --variant inductor.triton.enable_pdl=1;
    # llamaforge's step replays CUDA graphs as the trainer does by default: --variant inductor.triton.cudagraphs=0
    # times it without them
    (cd benchmarks && $py train_throughput.py --gpu --no-hf-eager --profile 3 ${extra[@]+"${extra[@]}"} \
        --json "$out/train.json") >"$out/train.log" 2>&1
    tail -n 40 "$out/train.log"
    ;;
final)
    (cd benchmarks && $py generate_throughput.py "${spec[@]}" --batch 1 8 32 --new-tokens 256 "$@" \
        --json "$out/generate.json") >"$out/generate.log" 2>&1
    tail -n 4 "$out/generate.log"
    (cd benchmarks && $py quant_speed.py --gpu --int8-gemv --json "$out/quant.json") >"$out/quant.log" 2>&1
    tail -n 6 "$out/quant.log"
    ;;
*)
    echo "unknown stage '$stage': tests, decode, int8, gemv, fused, micro, route, int8mm, train or final" >&2
    exit 2
    ;;
esac
