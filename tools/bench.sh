#!/usr/bin/env bash
# graft against diffusers + PEFT, side by side: builds release, runs every workload of
# `graft bench` and of tools/reference/bench_reference.py back to back (graft, then the
# reference, workload by workload, so both see the same machine load), and prints the table.
#
#   tools/bench.sh                      # every workload
#   tools/bench.sh tiny. real.block     # workloads by name or prefix
#
# Environment: THREADS (default: nproc) for both sides, ROUNDS (default 1: repeat everything and
# keep each workload's median round), RUNS (timed runs per workload; default: each workload's
# own), PYTHON (default /work/refvenv/bin/python, see tools/reference/setup.sh), OUT (default
# target/bench: graft.jsonl, reference.jsonl, table.md).
set -euo pipefail
cd "$(dirname "$0")/.."

THREADS=${THREADS:-$(nproc)}
ROUNDS=${ROUNDS:-1}
PYTHON=${PYTHON:-/work/refvenv/bin/python}
OUT=${OUT:-target/bench}
REF=tools/reference/bench_reference.py

echo "building release (graft, lora plugin)..." >&2
cargo build --release -q -p graft-host -p lora
GRAFT=target/release/graft
mkdir -p "$OUT"
: > "$OUT/graft.jsonl"
: > "$OUT/reference.jsonl"

filters=()
for w in "$@"; do filters+=(--workload "$w"); done
mapfile -t names < <("$GRAFT" bench --list "${filters[@]}" | awk '{print $1}')
mapfile -t ref_names < <("$PYTHON" "$REF" --list)
runs=()
if [[ -n "${RUNS:-}" ]]; then runs=(--runs "$RUNS"); fi

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); threads $THREADS; load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for round in $(seq 1 "$ROUNDS"); do
  for w in "${names[@]}"; do
    echo "[$round/$ROUNDS] $w" >&2
    "$GRAFT" bench --workload "$w" --threads "$THREADS" "${runs[@]}" \
      --plugins target/release --no-default-plugins 2>/dev/null | grep '^{' >> "$OUT/graft.jsonl"
    if printf '%s\n' "${ref_names[@]}" | grep -qx "$w"; then
      "$PYTHON" "$REF" --workload "$w" --threads "$THREADS" "${runs[@]}" 2>/dev/null | grep '^{' >> "$OUT/reference.jsonl"
    fi
  done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

"$PYTHON" "$REF" --table "$OUT/graft.jsonl" "$OUT/reference.jsonl" --markdown > "$OUT/table.md"
"$PYTHON" "$REF" --table "$OUT/graft.jsonl" "$OUT/reference.jsonl"
echo >&2
echo "records: $OUT/graft.jsonl, $OUT/reference.jsonl; Markdown table: $OUT/table.md" >&2
