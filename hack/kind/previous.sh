#!/usr/bin/env bash
# Builds the previous release for the upgrade test: its source tree at
# PREVIOUS_RELEASE_REV (hack/versions.env), taken from this repository's git history, and
# its agent binary, both cached under $PORTASSIGN_PREVIOUS_CACHE (default
# ~/.cache/portassign/previous/<rev>). Prints two lines: the source tree (its chart is
# charts/portassign) and the release binary.
#
# Needs the commit in the local history (a full clone; a shallow one fails and says so).
set -euo pipefail
# shellcheck disable=SC2034 # used by lib.sh
KLOG_NAME=previous
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

rev=$PREVIOUS_RELEASE_REV
dir=${PORTASSIGN_PREVIOUS_CACHE:-$HOME/.cache/portassign/previous}/$rev
src=$dir/src
binary=$dir/target/release/portassign
if [ ! -f "$src/Cargo.toml" ]; then
  git -C "$REPO" cat-file -e "$rev^{commit}" 2>/dev/null ||
    kdie "commit $rev (the previous release) is not in this clone's history; fetch it (git fetch --unshallow)"
  klog "extracting the previous release ($rev) into $src"
  rm -rf "$src.tmp"; mkdir -p "$src.tmp"
  git -C "$REPO" archive "$rev" | tar -x -C "$src.tmp"
  rm -rf "$src"; mv "$src.tmp" "$src"
fi
if [ ! -x "$binary" ]; then
  klog "cargo build --release of the previous release (a few minutes the first time)"
  (cd "$src" && CARGO_TARGET_DIR=$dir/target cargo build --release --locked --bin portassign >&2)
fi
echo "$src"
echo "$binary"
