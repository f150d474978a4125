#!/usr/bin/env bash
# The one test command: installs what the tests need if it is missing
# (protoc, libclang, the PostgreSQL server, etcd; needs root or sudo and apt-get), then
# runs the formatter check, clippy and the whole test suite.
#
#   scripts/test.sh                 # everything; no test may skip (FLOTILLA_TEST_NO_SKIP=1)
#   scripts/test.sh --test e2e      # extra arguments go to `cargo test` (the agent's
#                                   # PostgreSQL tests then skip unless FLOTILLA_TEST_PG_URL is set)
#
# Environment:
#   FLOTILLA_SKIP_INSTALL=1   never install anything, just check and run
#   FLOTILLA_PG_BINDIR        directory with initdb/pg_ctl/psql (else found
#                             via pg_config, /usr/lib/postgresql/*/bin, PATH)
#   FLOTILLA_ETCD_BIN         etcd binary (else found on PATH)
#   FLOTILLA_PROMETHEUS_BIN   prometheus binary (else found on PATH)
#   FLOTILLA_PROMTOOL_BIN     promtool binary (else beside prometheus, or on PATH)
#   FLOTILLA_KEEP_TEST_DIRS=1 keep the tests' temp dirs (data dirs, logs)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# shellcheck source=scripts/deps.sh
source scripts/deps.sh

# --- What the tests need -------------------------------------------------------

missing_packages() {
    local packages=()
    have_protoc || packages+=(protobuf-compiler)
    have_protobuf_includes || packages+=(libprotobuf-dev)
    have_libclang || packages+=(libclang-dev)
    find_initdb >/dev/null || packages+=(postgresql)
    find_etcd >/dev/null || packages+=(etcd-server)
    # The waves' Prometheus gate is tested against a real Prometheus server; its
    # promtool checks and unit-tests the alert rules (deploy/prometheus/).
    { find_prometheus >/dev/null && find_promtool >/dev/null; } || packages+=(prometheus)
    # As root the tests run PostgreSQL as the postgres user via runuser.
    if is_root && ! command -v runuser >/dev/null 2>&1; then
        packages+=(util-linux)
    fi
    echo "${packages[@]}"
}

section "Checking test dependencies"
command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (https://rustup.rs)"
ensure_packages
echo "protoc: $(command -v protoc) ($(protoc --version))"
echo "initdb: $(find_initdb)"
echo "etcd:   $(find_etcd)"
echo "prometheus: $(find_prometheus)"
echo "promtool: $(find_promtool)"
cargo --version

# --- Checks ------------------------------------------------------------------

# A one-off build (CI, a fresh clone) gains nothing from incremental caches, which
# were a third of the target directory (2.3 of 7 GB); a developer's own setting stays.
if [[ -n "${CI:-}" ]]; then
    export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
fi
df -h . 2>/dev/null | tail -n 1 | awk '{print "disk free where the build goes: " $4}' || true

failed=()

run_step() {
    local name="$1"
    shift
    section "$name: $*"
    if "$@"; then
        echo "---- $name: ok"
    else
        echo "---- $name: FAILED (exit $?)"
        failed+=("$name")
    fi
}

# The agent crate's own tests talk to a real PostgreSQL named by FLOTILLA_TEST_PG_URL
# (and, for the "cannot prepare" case, FLOTILLA_TEST_PG_URL_NO_2PC): give them
# throwaway clusters (the e2e suite starts its own clusters per test).
SCRATCH_STOPS=()
SCRATCH_DIRS=()
# scratch_pg VAR max_prepared_transactions: starts a cluster, exports VAR=its URL.
scratch_pg() {
    local var="$1" mpt="$2" bindir dir port runas=()
    bindir="$(dirname "$(find_initdb)")"
    dir="$(mktemp -d /tmp/flotilla-scratch-pg.XXXXXX)"
    chmod 755 "$dir"
    if is_root; then
        chown postgres "$dir"
        runas=(runuser -u postgres --)
    fi
    SCRATCH_DIRS+=("$dir")
    for attempt in 1 2 3 4 5; do
        port=$((15000 + RANDOM % 15000))
        rm -rf "$dir/data"
        "${runas[@]}" "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C --no-sync >/dev/null &&
            "${runas[@]}" "$bindir/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
                -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100 -c max_prepared_transactions=$mpt" \
                start >/dev/null &&
            {
                SCRATCH_STOPS+=("${runas[*]} $bindir/pg_ctl -D $dir/data -m immediate stop")
                export "$var=postgres://postgres@127.0.0.1:$port/postgres"
                echo "scratch PostgreSQL ($var, max_prepared_transactions=$mpt) on port $port"
                return 0
            }
        echo "scratch PostgreSQL did not start on port $port (attempt $attempt)"
    done
    return 1
}
stop_scratch_pg() {
    local cmd dir
    for cmd in "${SCRATCH_STOPS[@]}"; do
        $cmd >/dev/null 2>&1 || true
    done
    for dir in "${SCRATCH_DIRS[@]}"; do
        rm -rf "$dir"
    done
}
trap stop_scratch_pg EXIT
if [[ $# -eq 0 ]]; then
    # The whole suite (as CI runs it): a test that would skip for want of a server fails
    # instead (flotilla_testkit::skip), so a server missing here cannot pass as green.
    export FLOTILLA_TEST_NO_SKIP=1
    if [[ -z "${FLOTILLA_TEST_PG_URL:-}" ]]; then
        scratch_pg FLOTILLA_TEST_PG_URL 20 || die "could not start a scratch PostgreSQL for the agent's tests"
    fi
    if [[ -z "${FLOTILLA_TEST_PG_URL_NO_2PC:-}" ]]; then
        scratch_pg FLOTILLA_TEST_PG_URL_NO_2PC 0 || die "could not start a second scratch PostgreSQL"
    fi
fi

# The alert rules: valid, and their unit tests (deploy/prometheus/alerts_test.yml) pass.
# (check-deploy.sh below checks the Prometheus configurations; the e2e suite checks the
# metrics themselves, tests/e2e/observability.rs.)
PROMTOOL="$(find_promtool)"
export FLOTILLA_PROMTOOL_BIN="$PROMTOOL"
run_step "Alert rules" "$PROMTOOL" check rules deploy/prometheus/alerts.yml
run_step "Alert rule tests" bash -c 'cd deploy/prometheus && "$FLOTILLA_PROMTOOL_BIN" test rules alerts_test.yml'
run_step "Formatting" cargo fmt --all -- --check
# deploy/ (systemd, compose, Kubernetes, Prometheus) and the Dockerfile, checked
# without a Docker daemon or a cluster; installs its pinned checkers on first use.
run_step "Deploy files" scripts/check-deploy.sh
run_step "Clippy" cargo clippy --workspace --all-targets -- -D warnings
# The `testing` feature compiles the named failpoints in, for the fault tests
# (they do nothing unless FAILPOINTS names them).
run_step "Tests" cargo test --workspace --features flotilla/testing "$@"

section "Summary"
if ((${#failed[@]} > 0)); then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all checks passed"
