# Sourced by scripts/test.sh and scripts/quickstart.sh: finding (and, on Debian,
# installing) what Flotilla needs: protoc, libclang, the PostgreSQL server, etcd, Prometheus.
# Each script says which of them it needs (its own missing_packages).

section() {
    printf '\n==== %s ====\n' "$*"
}

die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# --- What is missing? --------------------------------------------------------

have_protoc() {
    command -v protoc >/dev/null 2>&1
}

# etcd-client's build compiles etcd's protos, which import google/protobuf/*.proto:
# Debian ships those in libprotobuf-dev, which protobuf-compiler only recommends.
have_protobuf_includes() {
    [[ -f /usr/include/google/protobuf/descriptor.proto ]] ||
        [[ -n "${PROTOC_INCLUDE:-}" && -f "${PROTOC_INCLUDE}/google/protobuf/descriptor.proto" ]]
}

# The core crate's PostgreSQL parser (crate pg_query: libpg_query, for the lint and
# the dry run's lock levels) generates its bindings with bindgen, which loads libclang
# at build time; Debian ships it (with the clang headers bindgen needs) in libclang-dev.
# (libclang-cpp, which LLVM's packages bring, is another library: not matched.)
have_libclang() {
    if [[ -n "${LIBCLANG_PATH:-}" ]] && compgen -G "${LIBCLANG_PATH}/libclang*.so*" >/dev/null; then
        return 0
    fi
    compgen -G "/usr/lib/llvm-*/lib/libclang.so*" >/dev/null ||
        compgen -G "/usr/lib/*/libclang.so*" >/dev/null ||
        compgen -G "/usr/lib/*/libclang-[0-9]*.so*" >/dev/null
}

# Same search order as testkit/src/postgres.rs (PgBins::locate). Debian's postgresql
# package keeps initdb in /usr/lib/postgresql/NN/bin, not on PATH.
find_initdb() {
    local dir
    if [[ -n "${FLOTILLA_PG_BINDIR:-}" && -x "${FLOTILLA_PG_BINDIR}/initdb" ]]; then
        echo "${FLOTILLA_PG_BINDIR}/initdb"
        return 0
    fi
    if command -v pg_config >/dev/null 2>&1; then
        dir="$(pg_config --bindir 2>/dev/null || true)"
        if [[ -n "$dir" && -x "$dir/initdb" ]]; then
            echo "$dir/initdb"
            return 0
        fi
    fi
    # Newest version first: /usr/lib/postgresql/NN/bin, NN is field 5.
    for dir in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -t/ -k5,5 -rn); do
        if [[ -x "$dir/initdb" ]]; then
            echo "$dir/initdb"
            return 0
        fi
    done
    command -v initdb 2>/dev/null
}

find_etcd() {
    if [[ -n "${FLOTILLA_ETCD_BIN:-}" && -x "${FLOTILLA_ETCD_BIN}" ]]; then
        echo "${FLOTILLA_ETCD_BIN}"
        return 0
    fi
    command -v etcd 2>/dev/null
}

find_prometheus() {
    if [[ -n "${FLOTILLA_PROMETHEUS_BIN:-}" && -x "${FLOTILLA_PROMETHEUS_BIN}" ]]; then
        echo "${FLOTILLA_PROMETHEUS_BIN}"
        return 0
    fi
    command -v prometheus 2>/dev/null
}

# Debian's prometheus package ships promtool beside prometheus.
find_promtool() {
    local prometheus
    if [[ -n "${FLOTILLA_PROMTOOL_BIN:-}" && -x "${FLOTILLA_PROMTOOL_BIN}" ]]; then
        echo "${FLOTILLA_PROMTOOL_BIN}"
        return 0
    fi
    if prometheus="$(find_prometheus)" && [[ -x "$(dirname "$prometheus")/promtool" ]]; then
        echo "$(dirname "$prometheus")/promtool"
        return 0
    fi
    command -v promtool 2>/dev/null
}

is_root() {
    [[ "$(id -u)" -eq 0 ]]
}

# --- Installing --------------------------------------------------------------

install_packages() {
    local packages=("$@") sudo=()
    if ! is_root; then
        command -v sudo >/dev/null 2>&1 ||
            die "missing ${packages[*]}: run as root, install sudo, or install them yourself"
        sudo=(sudo)
    fi
    command -v apt-get >/dev/null 2>&1 ||
        die "missing ${packages[*]} and no apt-get here: install them yourself (protoc, the PostgreSQL server: initdb, pg_ctl, psql; etcd and prometheus for the tests)"

    echo "installing: ${packages[*]}"
    "${sudo[@]}" apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${packages[@]}"

    # The postgresql package may have created and started a system cluster
    # (15/main on port 5432). The tests use their own clusters on other
    # ports; stop it so it does not sit in memory. Best effort.
    if [[ " ${packages[*]} " == *" postgresql "* ]] && command -v pg_lsclusters >/dev/null 2>&1; then
        pg_lsclusters --no-header 2>/dev/null | while read -r version name _port status _rest; do
            if [[ "$status" == online* ]]; then
                echo "stopping the system PostgreSQL cluster $version/$name started by the package"
                "${sudo[@]}" pg_ctlcluster "$version" "$name" stop || true
            fi
        done
    fi
    # (etcd-server may likewise start a system etcd on 2379; the tests use
    # their own ports, so it is left alone.)
}

ensure_postgres_user() {
    # PostgreSQL refuses to run as root; as root the harness runs it as
    # `postgres`. The postgresql package creates that user; a hand-built
    # PostgreSQL may not have.
    if is_root && ! id postgres >/dev/null 2>&1; then
        echo "creating the postgres system user"
        useradd --system --no-create-home --shell /usr/sbin/nologin postgres
    fi
}


# Installs what the caller's `missing_packages` names (unless FLOTILLA_SKIP_INSTALL=1),
# then checks again.
ensure_packages() {
    local packages=()
    read -r -a packages <<<"$(missing_packages)"
    if ((${#packages[@]} > 0)); then
        if [[ "${FLOTILLA_SKIP_INSTALL:-}" == 1 ]]; then
            die "missing ${packages[*]} (FLOTILLA_SKIP_INSTALL=1, not installing)"
        fi
        install_packages "${packages[@]}"
        read -r -a packages <<<"$(missing_packages)"
        ((${#packages[@]} == 0)) || die "still missing after installing: ${packages[*]}"
    fi
    ensure_postgres_user
}
