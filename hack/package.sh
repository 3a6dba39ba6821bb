#!/usr/bin/env bash
# `make package`: the chart archive, byte for byte the same for the same sources.
# `helm package` stamps every file with the current time, so its archive is unpacked and
# packed again with the time of the last commit that touched the chart (or
# $SOURCE_DATE_EPOCH), names sorted, owner 0, and gzip without a name or time.
# Prints the archive's path: $1 (default dist/)/portassign-<version>.tgz.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=$(mkdir -p "${1:-$repo/dist}" && cd "${1:-$repo/dist}" && pwd)
helm="$("$repo/hack/build-tools.sh" helm)/helm"
epoch=${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct -- charts/portassign 2>/dev/null || echo 0)}
work=$(mktemp -d "${TMPDIR:-/tmp}/portassign-package.XXXXXX")
trap 'rm -rf "$work"' EXIT
"$helm" package "$repo/charts/portassign" --destination "$work/helm" >&2
archive=$(ls "$work"/helm/*.tgz)
mkdir "$work/tree"
tar -xzf "$archive" -C "$work/tree"
name=$(basename "$archive")
tar -C "$work/tree" --sort=name --mtime="@$epoch" --owner=0 --group=0 --numeric-owner \
  --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime -cf - "$(ls "$work/tree")" | gzip -n -9 > "$out/$name.tmp"
mv "$out/$name.tmp" "$out/$name"
echo "$out/$name"
