#!/usr/bin/env bash
# Runs each fuzz target in fuzz/ for a bounded time and reports which, if
# any, crashed.
#
#   scripts/fuzz.sh                    every target, 60 s each
#   FUZZ_SECONDS=600 scripts/fuzz.sh   longer runs
#   scripts/fuzz.sh manifest wire      only these targets
#
# Needs a nightly toolchain and cargo-fuzz; both are installed if missing.
# Corpora grow in fuzz/corpus/<target>/ (seeded from fuzz/seeds/ and the
# sample components); crashing inputs land in fuzz/artifacts/<target>/.
# Neither is tracked by git. The build goes to $CARGO_TARGET_DIR when set.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fuzz_dir="$root/fuzz"
seconds="${FUZZ_SECONDS:-60}"
all_targets=(manifest wire bus_http artifact_check artifact)
if (($# > 0)); then targets=("$@"); else targets=("${all_targets[@]}"); fi

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-fuzz needs a nightly toolchain; installing it (rustup toolchain install nightly --profile minimal)" >&2
    rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-fuzz is not installed; installing it (cargo install cargo-fuzz --locked)" >&2
    cargo install cargo-fuzz --locked
fi

# Seeds the corpus for one target. The corpus directory is the fuzzer's
# working set, so seeds are copied in rather than pointed at.
seed() {
    local target="$1" corpus="$fuzz_dir/corpus/$1"
    mkdir -p "$corpus"
    if [[ -d "$fuzz_dir/seeds/$target" ]]; then
        cp -n "$fuzz_dir/seeds/$target"/* "$corpus"/ 2>/dev/null || true
    fi
    if [[ "$target" == bus_http ]]; then
        printf 'GET /a?b=1 HTTP/1.1\r\nhost: web.shop\r\nx-one: 1\r\n\r\nbody' >"$corpus/get.http"
        printf 'POST / HTTP/1.1\r\ncontent-type: text/plain\r\n\r\n' >"$corpus/post.http"
    fi
    if [[ "$target" == artifact || "$target" == artifact_check ]]; then
        # An empty core module (`(module)`) and an empty component: both
        # valid wasm that `Runtime::load` must refuse with an error.
        printf '\0asm\x01\0\0\0' >"$corpus/empty-module.wasm"
        printf '\0asm\x0d\0\x01\0' >"$corpus/empty-component.wasm"
        local hello="$root/sample-services/target/wasm32-wasip2/release/hello.wasm"
        if [[ -f "$hello" ]]; then
            cp "$hello" "$corpus/hello.wasm"
        else
            echo "fuzz.sh: $hello is not built; the artifact corpus starts without a valid component" >&2
        fi
    fi
}

cd "$fuzz_dir"
failed=()
for target in "${targets[@]}"; do
    seed "$target"
    echo "fuzz.sh: running $target for ${seconds}s" >&2
    # -max_len: components are larger than libFuzzer's 4 KiB default, and
    # the other targets gain nothing from megabyte inputs.
    max_len=4096
    [[ "$target" == artifact || "$target" == artifact_check ]] && max_len=262144
    # Built first, so a build that fails is not reported as a crash.
    if ! cargo +nightly fuzz build "$target"; then
        failed+=("$target")
        echo "fuzz.sh: $target did not BUILD (see cargo's errors above); nothing was fuzzed" >&2
        continue
    fi
    if ! cargo +nightly fuzz run "$target" "corpus/$target" -- \
        -max_total_time="$seconds" -max_len="$max_len" -print_final_stats=1; then
        failed+=("$target")
        echo "fuzz.sh: $target CRASHED; the input is in fuzz/artifacts/$target/" >&2
    fi
done

if ((${#failed[@]} > 0)); then
    echo "fuzz.sh: crashes or failed builds in: ${failed[*]}" >&2
    ls -l "${failed[@]/#/$fuzz_dir/artifacts/}" >&2 2>/dev/null || true
    exit 1
fi
echo "fuzz.sh: no crashes in ${targets[*]} (${seconds}s each)" >&2
