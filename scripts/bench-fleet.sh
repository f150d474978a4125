#!/usr/bin/env bash
# Fleet state benchmark (issue 12): `fleet status`, `fleet show` and `fleet drift` over the reference fleet
# at 10,000 tenants (4 shard databases x 2,500 tenant schemas, ../shared/bench/make-fleet.sh
# 4 2500 5), after COORD-2025-001 rolled across all of them, answered from the leader's copy
# of the agents' journals. Prints the time to answer (median of REPEAT calls, each a whole
# CLI process: connect, ask, render) and the size of the answer.
#
#   scripts/bench-fleet.sh [REPEAT]          (default 5)
#
# Environment: SHARED (default ../shared beside the repo), SHARDS (4), TENANTS (2500), PAR (8),
# FLOTILLA_PG_BINDIR, FLOTILLA_BENCH_KEEP=1 keeps the logs and the server's data dir.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
SHARED=${SHARED:-$ROOT/../shared}
BENCH=$SHARED/bench
REPEAT=${1:-5}
SHARDS=${SHARDS:-4}; TENANTS=${TENANTS:-2500}; PAR=${PAR:-8}
[ -x "$BENCH/make-fleet.sh" ] || { echo "error: $BENCH/make-fleet.sh not found (set SHARED)" >&2; exit 2; }

bindir=${FLOTILLA_PG_BINDIR:-}
[ -n "$bindir" ] || bindir=$(pg_config --bindir 2>/dev/null || true)
[ -x "$bindir/initdb" ] || bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5,5 -rn | head -1)
[ -x "$bindir/initdb" ] || { echo "error: initdb not found; run scripts/test.sh once to install PostgreSQL" >&2; exit 2; }

echo "==== building flotilla (release)"
cargo build --release --quiet --bin flotilla
FLOTILLA=$ROOT/target/release/flotilla

work=$(mktemp -d /tmp/flotilla-bench-fleet.XXXXXX)
chmod 755 "$work"
as_pg=()
if [ "$(id -u)" -eq 0 ]; then
  chown postgres "$work"
  as_pg=(runuser -u postgres --)
fi
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  "${as_pg[@]}" "$bindir/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true
  if [ -n "${FLOTILLA_BENCH_KEEP:-}" ]; then echo "logs kept in $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

port=$(( 20000 + RANDOM % 10000 ))
"${as_pg[@]}" "$bindir/initdb" -D "$work/data" -U postgres --auth=trust -E UTF8 --locale=C >/dev/null
"${as_pg[@]}" "$bindir/pg_ctl" -D "$work/data" -l "$work/pg.log" -w \
  -o "-p $port -k $work -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off -c max_locks_per_transaction=256" start >/dev/null
export PGURL="postgres://postgres@127.0.0.1:$port"
export PATH="$bindir:$PATH"

echo "==== building the reference fleet: $SHARDS shards x $TENANTS tenants"
"$BENCH/make-fleet.sh" "$SHARDS" "$TENANTS" 5 >/dev/null

cport=$(( port + 1 ))
addr="http://127.0.0.1:$cport"
"$FLOTILLA" coordinator --listen "127.0.0.1:$cport" --store "$work/store.db" >"$work/coordinator.log" 2>&1 &
pids+=($!)
for ((i=0; i<100; i++)); do grep -q "coordinator listening" "$work/coordinator.log" && break; sleep 0.1; done
for ((s=0; s<SHARDS; s++)); do
  FLOTILLA_LOG=warn "$FLOTILLA" --coordinator "$addr" agent --shard "shard_$s" --dsn "$PGURL/shard_$s" \
    --tenant-pattern 'tenant_%' --max-connections "$PAR" >"$work/agent-$s.log" 2>&1 &
  pids+=($!)
done
for ((i=0; i<600; i++)); do
  n=$("$FLOTILLA" --coordinator "$addr" fleet list --output json 2>/dev/null | grep -o '"connected":true' | wc -l || true)
  [ "$n" -eq "$SHARDS" ] && break; sleep 0.1
done

echo "==== rolling COORD-2025-001 across $((SHARDS * TENANTS)) tenants"
start=$(date +%s.%N)
"$FLOTILLA" --coordinator "$addr" plan submit "$BENCH/coord-2025-001" --wait --max-parallel "$PAR" >"$work/submit.log" 2>&1 \
  || { echo "error: the rollout failed:" >&2; tail -5 "$work/submit.log" >&2; exit 1; }
echo "rollout: $(echo "$(date +%s.%N) - $start" | bc)s"

# The view follows the journals by a moment: wait until every tenant is in one cohort.
expected=$((SHARDS * TENANTS))
for ((i=0; i<600; i++)); do
  got=$("$FLOTILLA" --coordinator "$addr" fleet status --output json | python3 -c 'import json,sys; d=json.load(sys.stdin); c=d["cohorts"]; print(c[0]["count"] if len(c)==1 else -1)')
  [ "$got" -eq "$expected" ] && break; sleep 0.2
done
[ "$got" -eq "$expected" ] || { echo "error: fleet status never showed $expected targets in one cohort" >&2; exit 1; }

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
time_cmd() {
  local out=$1; shift
  local s e
  s=$(date +%s.%N); "$@" >"$out" || echo "note: $* exited $?" >&2; e=$(date +%s.%N)
  echo "$e - $s" | bc
}
status_text=(); status_json=(); show=(); drift=()
for ((r=1; r<=REPEAT; r++)); do
  status_text+=("$(time_cmd "$work/status.txt" "$FLOTILLA" --coordinator "$addr" fleet status)")
  status_json+=("$(time_cmd "$work/status.json" "$FLOTILLA" --coordinator "$addr" fleet status --output json)")
  show+=("$(time_cmd "$work/show.txt" "$FLOTILLA" --coordinator "$addr" fleet show "tenant_$(printf %04d $((r * 7)))")")
  # exit 1 would mean drift: the reference fleet has none
  drift+=("$(time_cmd "$work/drift.txt" "$FLOTILLA" --coordinator "$addr" fleet drift)")
done
echo
echo "==== results (median of $REPEAT; $expected tenants on $SHARDS shards; whole CLI invocations)"
echo "fleet status (text):  $(printf '%s\n' "${status_text[@]}" | median)s   (goal: under 1 s)"
echo "fleet status (json):  $(printf '%s\n' "${status_json[@]}" | median)s   ($(wc -c <"$work/status.json") bytes)"
echo "fleet show TARGET:    $(printf '%s\n' "${show[@]}" | median)s"
echo "fleet drift:          $(printf '%s\n' "${drift[@]}" | median)s   (no drift expected; the agents' last full scan per shard:)"
grep 'catalog read' "$work/drift.txt" || true
head -3 "$work/status.txt"
