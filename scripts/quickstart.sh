#!/usr/bin/env bash
# The first command for a newcomer: on a fresh Debian machine, installs what is
# missing (protoc to build; the PostgreSQL server for the demo fleet: apt-get, as
# root or with sudo), builds flotilla, and runs `flotilla quickstart`, which rolls
# the coordinated example across a throwaway fleet and serves until Ctrl-C.
#
#   scripts/quickstart.sh                   # the demo
#   scripts/quickstart.sh --keep            # arguments go to `flotilla quickstart`
#
# Environment:
#   FLOTILLA_SKIP_INSTALL=1   never install anything
#   FLOTILLA_BIN=PATH         run this flotilla binary instead of building one
#   FLOTILLA_PG_BINDIR        directory with initdb/pg_ctl (else found as the tests do)
set -euo pipefail

# the caller's directory: `flotilla quickstart` runs there (a `--shard` run's store,
# flotilla-quickstart.db, is written where the command was given, not in the repository)
caller=$(pwd)
if [[ -n "${FLOTILLA_BIN:-}" && "$FLOTILLA_BIN" != /* && "$FLOTILLA_BIN" == */* ]]; then
    FLOTILLA_BIN="$caller/$FLOTILLA_BIN"
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# shellcheck source=scripts/deps.sh
source scripts/deps.sh

missing_packages() {
    local packages=()
    if [[ -z "${FLOTILLA_BIN:-}" ]]; then
        have_protoc || packages+=(protobuf-compiler)
        have_protobuf_includes || packages+=(libprotobuf-dev)
        have_libclang || packages+=(libclang-dev)
    fi
    find_initdb >/dev/null || packages+=(postgresql)
    # As root, PostgreSQL runs as the postgres user via runuser.
    if is_root && ! command -v runuser >/dev/null 2>&1; then
        packages+=(util-linux)
    fi
    echo "${packages[@]}"
}

ensure_packages
bin="${FLOTILLA_BIN:-}"
if [[ -z "$bin" ]]; then
    command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (https://rustup.rs)"
    section "Building flotilla"
    cargo build --bin flotilla
    bin="$(pwd)/target/debug/flotilla"
fi
[[ -x "$bin" ]] || die "$bin is not an executable flotilla"
FLOTILLA_PG_BINDIR="$(dirname "$(find_initdb)")"
export FLOTILLA_PG_BINDIR
cd "$caller"
exec "$bin" quickstart "$@"
