#!/usr/bin/env bash
# Runs every cargo-fuzz target (or the ones named) for SECONDS each (default 30).
#
#   fuzz/run.sh            # every target, 30 s each
#   fuzz/run.sh 300        # every target, 5 min each
#   fuzz/run.sh 60 recording_parse input_decode
#
# Needs a nightly toolchain (rustup toolchain install nightly) and cargo-fuzz
# (cargo install cargo-fuzz); installs cargo-fuzz if it is missing. Each target's
# corpus grows in fuzz/corpus/TARGET (seeded from fuzz/seeds/TARGET); crashes land in
# fuzz/artifacts/TARGET and make the script fail.
set -euo pipefail
cd "$(dirname "$0")"

seconds="${1:-30}"
shift || true

if ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzz/run.sh: needs a nightly toolchain: rustup toolchain install nightly" >&2
    exit 2
fi
if ! cargo fuzz --help >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

cargo +nightly fuzz build
status=0
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target"
    seeds=()
    if [ -d "seeds/$target" ]; then seeds=("seeds/$target"); fi
    # Recordings need room for several chunks; the message parsers stay small.
    case "$target" in
        recording_*) max_len=65536 ;;
        *) max_len=20000 ;;
    esac
    log="${TMPDIR:-/tmp}/fuzz-$target.log"
    echo "== $target: ${seconds}s (log: $log)"
    set +e
    cargo +nightly fuzz run "$target" "corpus/$target" "${seeds[@]}" -- \
        -max_total_time="$seconds" -max_len="$max_len" -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1
    rc=$?
    set -e
    grep -E '^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::peak_rss_mb)' "$log" || true
    if [ "$rc" -ne 0 ]; then
        tail -40 "$log" >&2
        echo "!! $target failed (exit $rc); the input is in fuzz/artifacts/$target" >&2
        status=1
    fi
done
exit "$status"
