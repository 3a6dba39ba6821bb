#!/usr/bin/env bash
# `make fuzz`: runs every cargo-fuzz target of fuzz/ for FUZZ_SECONDS each (default 60),
# one after the other, starting from the committed corpus fuzz/corpus/TARGET and
# writing what it finds to .local/fuzz/corpus/TARGET. A crash stops the run with the
# input saved under fuzz/artifacts/TARGET/ (turn it into a regression test, then fix).
#
# Usage: hack/fuzz.sh [TARGET ...]        (default: every target in fuzz/Cargo.toml)
#        hack/fuzz.sh --merge [TARGET ...] (replace fuzz/corpus/TARGET with a minimal set
#                                           covering it and .local/fuzz/corpus/TARGET)
# Environment: FUZZ_SECONDS (per target), FUZZ_NICE (nice level, default 10).
#
# What it needs, installed here on first use:
#  - cargo-fuzz, built with `cargo install --locked` into the tools cache
#    (${PORTASSIGN_TOOLS_CACHE:-~/.cache/portassign/tools}/cargo-fuzz-VERSION).
#  - A compiler that accepts -Zsanitizer (libFuzzer's instrumentation): a rustup nightly
#    toolchain if one is installed; otherwise the stable toolchain with
#    RUSTC_BOOTSTRAP=1, which unlocks the same flags.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
cache=${PORTASSIGN_TOOLS_CACHE:-$HOME/.cache/portassign/tools}
root="$cache/cargo-fuzz-$CARGO_FUZZ_VERSION"
if [ ! -x "$root/bin/cargo-fuzz" ]; then
  echo "[fuzz] installing cargo-fuzz $CARGO_FUZZ_VERSION into $root" >&2
  cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION" --root "$root"
fi
export PATH="$root/bin:$PATH"

toolchain=()
if command -v rustup >/dev/null && rustup toolchain list | grep -q '^nightly'; then
  toolchain=(+nightly)
else
  echo "[fuzz] no nightly toolchain: using stable with RUSTC_BOOTSTRAP=1" >&2
  export RUSTC_BOOTSTRAP=1
fi

merge=false
if [ "${1:-}" = "--merge" ]; then merge=true; shift; fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(sed -n '/^\[\[bin\]\]/,/^name/s/^name = "\(.*\)"/\1/p' fuzz/Cargo.toml)
fi
seconds=${FUZZ_SECONDS:-60}

for target in "${targets[@]}"; do
  committed="fuzz/corpus/$target"
  scratch=".local/fuzz/corpus/$target"
  mkdir -p "$committed" "$scratch"
  if $merge; then
    # A fresh minimal set (libFuzzer's set-cover merge, by edges, not hit counts) of
    # everything found so far replaces the committed corpus: small enough to commit,
    # the same edges covered.
    echo "[fuzz] $target: merging $scratch and $committed into $committed" >&2
    fresh=".local/fuzz/merged/$target"
    rm -rf "$fresh" && mkdir -p "$fresh"
    cargo "${toolchain[@]}" fuzz run --fuzz-dir fuzz "$target" "$fresh" "$committed" "$scratch" -- -set_cover_merge=1 -use_counters=0
    rm -rf "$committed" && mv "$fresh" "$committed"
    continue
  fi
  dict=()
  [ -f "fuzz/dicts/$target.dict" ] && dict=(-dict="fuzz/dicts/$target.dict")
  echo "[fuzz] $target: $seconds s, from $(date -u +%H:%M:%S)" >&2
  nice -n "${FUZZ_NICE:-10}" cargo "${toolchain[@]}" fuzz run --fuzz-dir fuzz "$target" "$scratch" "$committed" -- \
    -max_total_time="$seconds" -print_final_stats=1 -timeout=10 "${dict[@]}"
done
