#!/usr/bin/env bash
# `make sdk-deps`: installs the official SDKs e2e/tests/sdk.rs runs, exactly as the lock files
# under e2e/sdk/ pin them, into $BYOK_SDK_DIR (default ~/.cache/byok-operator/sdk):
#   python: a venv (pip --require-hashes, requirements.txt)     -> venv/
#   node:   npm ci (package-lock.json), linked as e2e/sdk/node/node_modules -> node/node_modules
#   go:     go build with go.sum (GOTOOLCHAIN=local)              -> go/byok-sdk-go
# Each part is skipped when its stamp (<part>.stamp: the SHA-256 of this script and the part's
# lock files, then the toolchain's version) matches; e2e/tests/sdk.rs checks the same digest.
# Arguments: the parts to install (default: all three).
set -euo pipefail
cd "$(dirname "$0")"
cache=${BYOK_SDK_DIR:-$HOME/.cache/byok-operator/sdk}
mkdir -p "$cache"

# The stamp: digest of this script and the files, then a toolchain line.
stamp_for() { # toolchain files...
  local toolchain=$1
  shift
  printf '%s\n%s\n' "$(cat install.sh "$@" | sha256sum | cut -d' ' -f1)" "$toolchain"
}
fresh() { # part stamp
  [ -f "$cache/$1.stamp" ] && [ "$(cat "$cache/$1.stamp")" = "$2" ]
}

python_part() {
  local python=${PYTHON:-python3} stamp
  need "$python" "Python 3.9 or newer, with venv"
  stamp=$(stamp_for "$("$python" --version 2>&1)" python/requirements.txt)
  if fresh python "$stamp" && [ -x "$cache/venv/bin/python" ]; then return; fi
  rm -rf "$cache/venv" "$cache/python.stamp"
  "$python" -m venv "$cache/venv"
  "$cache/venv/bin/pip" install --quiet --disable-pip-version-check --no-input \
    --require-hashes --no-deps --only-binary=:all: -r python/requirements.txt
  printf '%s\n' "$stamp" >"$cache/python.stamp"
}

node_part() {
  local stamp
  need node "Node.js 20 or newer, and npm"
  need npm "Node.js 20 or newer, and npm"
  stamp=$(stamp_for "node $(node --version)" node/package.json node/package-lock.json)
  if ! { fresh node "$stamp" && [ -d "$cache/node/node_modules" ]; }; then
    rm -rf "$cache/node" "$cache/node.stamp"
    mkdir -p "$cache/node"
    cp node/package.json node/package-lock.json "$cache/node/"
    # No install scripts: none of these packages needs one to work.
    (cd "$cache/node" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
    printf '%s\n' "$stamp" >"$cache/node.stamp"
  fi
  # The program in e2e/sdk/node resolves its imports from here.
  if [ -e node/node_modules ] && [ ! -L node/node_modules ]; then rm -rf node/node_modules; fi
  ln -sfn "$cache/node/node_modules" node/node_modules
}

go_part() {
  local stamp
  need go "the Go toolchain that builds e2e/k8s-testbins"
  stamp=$(GOTOOLCHAIN=local stamp_for "$(GOTOOLCHAIN=local go version)" go/go.mod go/go.sum go/main.go)
  if fresh go "$stamp" && [ -x "$cache/go/byok-sdk-go" ]; then return; fi
  rm -f "$cache/go.stamp"
  mkdir -p "$cache/go"
  (cd go && GOTOOLCHAIN=local GOFLAGS=-mod=readonly go build -trimpath -o "$cache/go/byok-sdk-go.new" .)
  mv "$cache/go/byok-sdk-go.new" "$cache/go/byok-sdk-go"
  printf '%s\n' "$stamp" >"$cache/go.stamp"
}

need() { # command what
  command -v "$1" >/dev/null || { echo "make sdk-deps: $1 is required ($2)" >&2; exit 1; }
}

parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(python node go)
for part in "${parts[@]}"; do
  case $part in
    python | node | go) "${part}_part" ;;
    *) echo "install.sh: unknown part $part (python, node, go)" >&2; exit 2 ;;
  esac
done
