#!/usr/bin/env bash
# Builds the previous release of byok-operator (PREVIOUS_RELEASE in versions.env) for the Helm
# upgrade test: its static binary (as `make static` builds it) and its chart, taken from this
# repository's history. Cached under ${BYOK_RELEASES_CACHE:-$HOME/.cache/byok-operator/releases}/<commit>/;
# builds only when that is empty. Prints the directory on stdout; progress goes to stderr.
#
# The build has a target directory of its own in the cache, never this checkout's: both
# packages are `byok-operator` at the root of a workspace, and cargo would take one build for
# the other (the same unit hash). A cold build compiles every dependency once (a few minutes);
# later releases reuse them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
. "$here/versions.env"
cache_root=${BYOK_RELEASES_CACHE:-$HOME/.cache/byok-operator/releases}
out="$cache_root/$PREVIOUS_RELEASE"
if [ -x "$out/byok-operator" ] && [ -f "$out/chart/Chart.yaml" ]; then echo "$out"; exit 0; fi

if ! git -C "$root" cat-file -e "$PREVIOUS_RELEASE^{commit}" 2>/dev/null; then
  echo "$0: commit $PREVIOUS_RELEASE is not in this clone's history; the Helm upgrade test builds the" >&2
  echo "previous release from it (a shallow clone needs: git fetch --unshallow)" >&2
  exit 1
fi
mkdir -p "$cache_root"
# One build at a time in the shared cache (two checkouts or CI jobs of one user).
exec 9>"$cache_root/.lock"
flock 9
if [ -x "$out/byok-operator" ] && [ -f "$out/chart/Chart.yaml" ]; then echo "$out"; exit 0; fi
echo "building the previous release ${PREVIOUS_RELEASE:0:12} (a cold build takes a few minutes)..." >&2
start=$SECONDS
target=x86_64-unknown-linux-musl
src="$cache_root/src"
rm -rf "$src"
mkdir -p "$src"
# -m: sources newer than any earlier release's build, which cargo would otherwise take as
# fresh (every release is the same package, byok-operator 0.1.0, at the same path).
git -C "$root" archive "$PREVIOUS_RELEASE" | tar -x -m -C "$src"
CC_x86_64_unknown_linux_musl=musl-gcc "${CARGO:-cargo}" build -q --release --locked --target "$target" \
  --manifest-path "$src/Cargo.toml" --target-dir "$cache_root/target" --bin byok-operator >&2
rm -rf "$out.tmp"; mkdir -p "$out.tmp"
cp "$cache_root/target/$target/release/byok-operator" "$out.tmp/byok-operator"
cp -r "$src/charts/byok-operator" "$out.tmp/chart"
rm -rf "$out"; mv "$out.tmp" "$out" # rename last: an interrupted build never looks finished
echo "built the previous release in $((SECONDS - start))s" >&2
echo "$out"
