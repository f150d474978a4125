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
REPEAT=${1:-5}
SHARDS=${SHARDS:-4}; TENANTS=${TENANTS:-2500}; PAR=${PAR:-8}
source scripts/bench-lib.sh

bench_init flotilla-bench-fleet
bench_build
bench_start_pg -c fsync=off -c max_locks_per_transaction=256

echo "==== building the reference fleet: $SHARDS shards x $TENANTS tenants"
"$BENCH/make-fleet.sh" "$SHARDS" "$TENANTS" 5 >/dev/null

bench_coordinator $(( port + 1 )) "$work/coordinator.log" "$work/store.db"
bench_agents fleet
bench_wait_connected 600

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
