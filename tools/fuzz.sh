#!/usr/bin/env bash
# Coverage-guided fuzzing of graft's input readers, for a bounded time per target.
#
#   tools/fuzz.sh                 # every target, 60 s each
#   tools/fuzz.sh 300             # every target, 300 s each
#   tools/fuzz.sh 30 adapter_file # one target
#
# Targets (fuzz/fuzz_targets/): safetensors_header, adapter_file, kohya_toml, sample_prompts,
# train_config, image, lora_syntax. Seeds are in fuzz/seeds/<target>/ and are copied into the
# working corpus fuzz/corpus/<target>/ (not committed). A finding is written to
# fuzz/artifacts/<target>/ and stops the run with a non-zero status; reproduce it with
#   cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>
#
# libFuzzer runs with -malloc_limit_mb=300 (a size read from a header must never turn into a huge
# allocation; graft decodes an image into at most 256 MiB), -rss_limit_mb and a per-input timeout.
#
# Needs a nightly toolchain (cargo-fuzz builds with -Zsanitizer). Without one, and when none can
# be installed, the script says so and exits 2: the property tests cover the same readers on
# stable (cargo test -p graft-tests --test e2e reliability_fuzz::; PROPTEST_CASES=10000 for more).
#
# FUZZ_SANITIZER=none skips AddressSanitizer (faster; -malloc_limit_mb then does not apply).
set -euo pipefail

seconds="${1:-60}"
only="${2:-}"
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/fuzz"

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "fuzz.sh: no nightly toolchain; trying: rustup toolchain install nightly --profile minimal" >&2
    if ! rustup toolchain install nightly --profile minimal; then
        echo "fuzz.sh: nightly is not available here. cargo-fuzz needs it; run the property tests instead:" >&2
        echo "  cargo test -p graft-tests --test e2e reliability_fuzz::" >&2
        exit 2
    fi
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi
# The same dependency versions as the workspace (cargo adds libfuzzer-sys).
[ -f Cargo.lock ] || cp ../Cargo.lock Cargo.lock

sanitizer="${FUZZ_SANITIZER:-address}"
targets="${only:-$(cargo +nightly fuzz list)}"
cargo +nightly fuzz build -s "$sanitizer" $only
# The binaries are run directly, so a source edited meanwhile does not rebuild them mid-run.
triple="$(rustc +nightly -vV | sed -n 's/^host: //p')"
bin="target/$triple/release"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_odr_violation=0}"

summary=()
for t in $targets; do
    mkdir -p "corpus/$t"
    if [ -d "seeds/$t" ]; then
        cp -n seeds/"$t"/* "corpus/$t/" 2>/dev/null || true
    fi
    echo "== $t: ${seconds}s"
    log="$(mktemp)"
    set +e
    mkdir -p "artifacts/$t"
    "$bin/$t" "corpus/$t" -artifact_prefix="artifacts/$t/" \
        -max_total_time="$seconds" -max_len=16384 -timeout=20 \
        -rss_limit_mb=2048 -malloc_limit_mb=300 -print_final_stats=1 >"$log" 2>&1
    status=$?
    set -e
    grep -E 'DONE|stat::number_of_executed_units|SUMMARY|ERROR|panicked|malloc' "$log" | tail -20 || true
    runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo "?")
    if [ "$status" -ne 0 ]; then
        tail -60 "$log"
        echo "fuzz.sh: $t found a failure (see fuzz/artifacts/$t/)" >&2
        exit 1
    fi
    rm -f "$log"
    summary+=("$t: $runs inputs, corpus $(ls "corpus/$t" | wc -l) files")
done
echo
echo "no failure found:"
printf '  %s\n' "${summary[@]}"
