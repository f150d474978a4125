#!/usr/bin/env bash
# Two-phase commit benchmark (issue 3): the window between the first PREPARE TRANSACTION and
# the last COMMIT PREPARED of an atomic plan — the time every shard holds the plan's locks —
# rolling COORD-2025-001 atomically over 16 shard databases. Prints each run's window and the
# median. Everything runs here: one PostgreSQL server (max_prepared_transactions on), one
# etcd, a coordinator and 16 agents.
#
#   scripts/bench-two-phase.sh [REPEAT]      (default 5)
#
# Environment: SHARED (default ../shared), SHARDS (16), TENANTS (10 per shard).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
SHARED=${SHARED:-$ROOT/../shared}
BENCH=$SHARED/bench
REPEAT=${1:-5}
SHARDS=${SHARDS:-16}; TENANTS=${TENANTS:-10}
[ -x "$BENCH/make-fleet.sh" ] || { echo "error: $BENCH/make-fleet.sh not found (set SHARED)" >&2; exit 2; }
bindir=$(pg_config --bindir 2>/dev/null || true)
[ -x "$bindir/initdb" ] || bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5,5 -rn | head -1)
command -v etcd >/dev/null || { echo "error: etcd not found; run scripts/test.sh once to install it" >&2; exit 2; }

cargo build --release --quiet --bin flotilla
FLOTILLA=$ROOT/target/release/flotilla
work=$(mktemp -d /tmp/flotilla-2pc.XXXXXX); chmod 755 "$work"
as_pg=()
if [ "$(id -u)" -eq 0 ]; then chown postgres "$work"; as_pg=(runuser -u postgres --); fi
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  "${as_pg[@]}" "$bindir/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
port=$(( 20000 + RANDOM % 8000 ))
"${as_pg[@]}" "$bindir/initdb" -D "$work/data" -U postgres --auth=trust -E UTF8 --locale=C >/dev/null
"${as_pg[@]}" "$bindir/pg_ctl" -D "$work/data" -l "$work/pg.log" -w \
  -o "-p $port -k $work -c listen_addresses=127.0.0.1 -c max_connections=300 -c max_prepared_transactions=200" start >/dev/null
export PGURL="postgres://postgres@127.0.0.1:$port" PATH="$bindir:$PATH"
eport=$(( port + 1 )); epeer=$(( port + 2 ))
etcd --name b --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$eport" \
  --advertise-client-urls "http://127.0.0.1:$eport" --listen-peer-urls "http://127.0.0.1:$epeer" \
  --initial-advertise-peer-urls "http://127.0.0.1:$epeer" --initial-cluster "b=http://127.0.0.1:$epeer" >"$work/etcd.log" 2>&1 &
pids+=($!)
for ((i=0; i<100; i++)); do curl -fs "http://127.0.0.1:$eport/health" >/dev/null 2>&1 && break; sleep 0.1; done
echo "==== building $SHARDS shards x $TENANTS tenants"
"$BENCH/make-fleet.sh" "$SHARDS" "$TENANTS" 20 >/dev/null 2>&1

windows=()
for ((r=1; r<=REPEAT; r++)); do
  "$BENCH/make-fleet.sh" --reset "$SHARDS" >/dev/null 2>&1
  cport=$(( port + 10 + r ))
  addr="http://127.0.0.1:$cport"
  "$FLOTILLA" coordinator --listen "127.0.0.1:$cport" --store "$work/store-$r.db" --etcd "http://127.0.0.1:$eport" >"$work/c-$r.log" 2>&1 &
  pids+=($!)
  for ((s=0; s<SHARDS; s++)); do
    FLOTILLA_LOG=warn "$FLOTILLA" --coordinator "$addr" agent --shard "shard_$s" --dsn "$PGURL/shard_$s" \
      --tenant-pattern 'tenant_%' --etcd "http://127.0.0.1:$eport" >"$work/a-$r-$s.log" 2>&1 &
    pids+=($!)
  done
  for ((i=0; i<300; i++)); do
    n=$("$FLOTILLA" --coordinator "$addr" fleet list --output json 2>/dev/null | grep -o '"connected":true' | wc -l || true)
    [ "$n" -eq "$SHARDS" ] && break; sleep 0.1
  done
  out=$("$FLOTILLA" --coordinator "$addr" plan submit "$BENCH/coord-2025-001" --atomic --wait --max-parallel 16 --output json | tail -1)
  w=$(echo "$out" | grep -o 'COMMIT PREPARED: [0-9.]*s' | grep -o '[0-9.]*' | head -1)
  [ -n "$w" ] || { echo "error: run $r did not commit atomically: $out"; exit 1; }
  windows+=("$w"); echo "run $r: prepare->commit window ${w}s"
  for p in "${pids[@]:1}"; do kill "$p" 2>/dev/null || true; done
  wait "${pids[@]:1}" 2>/dev/null || true
  pids=("${pids[0]}")
done
med=$(printf '%s\n' "${windows[@]}" | sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}')
echo "==== median prepare->commit window across $SHARDS shards: ${med}s (of $REPEAT runs)"
