#!/usr/bin/env bash
# Two-phase commit benchmark (issue 3): the window between the first PREPARE TRANSACTION and
# the last COMMIT PREPARED of an atomic plan — the time every shard holds the plan's locks —
# rolling COORD-2025-001 atomically over 16 shard databases. Prints each run's window and the
# median. Everything runs here: one PostgreSQL server (max_prepared_transactions on), one
# etcd, a coordinator and 16 agents.
#
#   scripts/bench-two-phase.sh [REPEAT]          (default 5)
#   scripts/bench-two-phase.sh --scale [REPEAT]  2,500 tenants on one server (issue 15): one shard
#                                                database of 2,500 tenants (SHARDS=1 TENANTS=2500)
#
# The server gets max_prepared_transactions = every target + 16 (at least 200), and
# max_locks_per_transaction = MAX_LOCKS when set (PostgreSQL's default, 64, otherwise). Each
# run also prints the peak of the shared lock table (pg_locks rows off the fast path) and of
# pg_prepared_xacts, sampled every 0.2 s, and the server's shared_memory_size.
#
# Environment: SHARED (default ../shared), SHARDS (16), TENANTS (10 per shard), PAR (the plan's
# --max-parallel, 16), and bench-lib.sh's
# (FLOTILLA_BIN, FLOTILLA_PG_BINDIR, FLOTILLA_BENCH_KEEP).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
if [ "${1:-}" = "--scale" ]; then
  shift
  SHARDS=${SHARDS:-1}; TENANTS=${TENANTS:-2500}
fi
REPEAT=${1:-5}
PAR=${PAR:-16}
SHARDS=${SHARDS:-16}; TENANTS=${TENANTS:-10}
MAX_PREPARED=$(( SHARDS * TENANTS + 16 )); [ "$MAX_PREPARED" -ge 200 ] || MAX_PREPARED=200
locks_setting=(); [ -z "${MAX_LOCKS:-}" ] || locks_setting=(-c "max_locks_per_transaction=$MAX_LOCKS")
# shellcheck source=scripts/bench-lib.sh
source "$ROOT/scripts/bench-lib.sh"
command -v etcd >/dev/null || { echo "error: etcd not found; run scripts/test.sh once to install it" >&2; exit 2; }
bench_init flotilla-2pc
bench_build
bench_start_pg -c max_connections=300 -c "max_prepared_transactions=$MAX_PREPARED" "${locks_setting[@]}"
settings=$(psql -X -At "$PGURL/postgres" -c "SELECT string_agg(name || ' = ' || setting || COALESCE(' ' || unit, ''), ', ' ORDER BY name) FROM pg_settings WHERE name IN ('max_connections', 'max_prepared_transactions', 'max_locks_per_transaction', 'shared_memory_size', 'shared_buffers')")
echo "==== server: $settings"
# Peaks of the shared lock table and of the prepared transactions while a plan runs.
sample_locks() {
  local peak_locks=0 peak_prepared=0 l p
  while [ -e "$work/sampling" ]; do
    read -r l p < <(psql -X -At -F ' ' "$PGURL/postgres" -c "SELECT (SELECT count(*) FROM pg_locks WHERE NOT fastpath), (SELECT count(*) FROM pg_prepared_xacts)" 2>/dev/null || echo "0 0")
    [ "${l:-0}" -gt "$peak_locks" ] && peak_locks=$l
    [ "${p:-0}" -gt "$peak_prepared" ] && peak_prepared=$p
    echo "$peak_locks $peak_prepared" >"$work/peaks"
    sleep 0.2
  done
}
eport=$(( port + 1 ))
bench_etcd_start "$eport" $(( port + 2 ))
echo "==== building $SHARDS shards x $TENANTS tenants"
"$BENCH/make-fleet.sh" "$SHARDS" "$TENANTS" 20 >/dev/null 2>&1

walls=(); peaks_locks=(); peaks_prepared=(); windows=(); decisions=(); heards=(); pg_commits=(); holds_median=(); holds_p99=(); holds_max=(); slowest=(); beyond=(); locked_median=(); locked_max=()
for ((r=1; r<=REPEAT; r++)); do
  bench_reset_fleet "$SHARDS"
  cport=$(( port + 10 + r ))
  addr="http://127.0.0.1:$cport"
  bench_etcd_forget_store "$eport"
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
  touch "$work/sampling"; echo "0 0" >"$work/peaks"
  sample_locks & sampler=$!
  t0=$(now)
  out=$("$FLOTILLA" --coordinator "$addr" plan submit "$BENCH/coord-2025-001" --atomic --wait --max-parallel "$PAR" --output json | tail -1)
  wall=$(awk -v a="$(now)" -v b="$t0" 'BEGIN {printf "%.2f", a - b}')
  rm -f "$work/sampling"; wait "$sampler" 2>/dev/null || true
  read -r peak_locks peak_prepared <"$work/peaks"
  w=$(echo "$out" | grep -o 'COMMIT PREPARED: [0-9.]*s' | grep -o '[0-9.]*' | head -1)
  [ -n "$w" ] || { echo "error: run $r did not commit atomically: $out"; exit 1; }
  # The plan's message gives the agents' figures: the decision's two legs and each target's
  # hold (PREPARE to COMMIT PREPARED), median, p99 and max.
  figure() { echo "$out" | grep -o "$1 [0-9.]* ms" | head -1 | sed -e "s/^$1 //" -e 's/ ms$//'; }
  d1=$(figure 'last PREPARE to decision'); d2=$(figure 'decision to last COMMIT PREPARED')
  hm=$(figure 'median'); hp=$(figure 'p99'); hx=$(figure 'max'); sr=$(figure "the slowest target's steps")
  # each target's locks from its steps' start (its DDL takes them) to its COMMIT PREPARED
  lm=$(echo "$out" | grep -o "steps' start to COMMIT PREPARED: median [0-9.]* ms, max [0-9.]* ms" | grep -o '[0-9.]* ms' | sed 's/ ms//' | head -1)
  lx=$(echo "$out" | grep -o "steps' start to COMMIT PREPARED: median [0-9.]* ms, max [0-9.]* ms" | grep -o '[0-9.]* ms' | sed 's/ ms//' | tail -1)
  # decision durable -> the last agent got its Resolve: the rest of the leg is PostgreSQL's
  # COMMIT PREPAREDs
  heard=$(figure 'the last agent had it after'); heard=${heard:-0}
  [ -n "$d1" ] && [ -n "$hx" ] && [ -n "$sr" ] && [ -n "$lx" ] || { echo "error: run $r reported no two-phase timings: $out"; exit 1; }
  # goal (b): the longest hold at most 100 ms beyond the slowest target's steps
  bx=$(awk -v a="$hx" -v b="$sr" 'BEGIN {printf "%.1f", a - b}')
  decision=$(awk -v a="$d1" -v b="$d2" 'BEGIN {printf "%.1f", a + b}')
  pg=$(awk -v a="$d2" -v b="$heard" 'BEGIN {printf "%.1f", a - b}')
  walls+=("$wall"); peaks_locks+=("$peak_locks"); peaks_prepared+=("$peak_prepared")
  windows+=("$w"); decisions+=("$decision"); heards+=("$heard"); pg_commits+=("$pg"); holds_median+=("$hm"); holds_p99+=("$hp"); holds_max+=("$hx"); slowest+=("$sr"); beyond+=("$bx"); locked_median+=("$lm"); locked_max+=("$lx")
  echo "run $r: window ${w}s; decision latency ${decision} ms (last PREPARE -> decision ${d1} ms -> last COMMIT PREPARED ${d2} ms, of which the last agent had the decision after ${heard} ms); hold per target median ${hm} ms, p99 ${hp} ms, max ${hx} ms (the slowest target's steps ${sr} ms: ${bx} ms beyond them); steps' start to COMMIT PREPARED median ${lm} ms, max ${lx} ms; submit to end ${wall}s; peak lock table ${peak_locks} entries, ${peak_prepared} prepared"
  for p in "${pids[@]:1}"; do kill "$p" 2>/dev/null || true; done
  wait "${pids[@]:1}" 2>/dev/null || true
  pids=("${pids[0]}")
done
# Starts one session per shard database that waits for one instant two seconds ahead, then
# runs what `$1 SHARD` prints; sets `took` to the ms from that instant to the last one's end.
at_one_instant() {
  local what=$1 start last s
  start=$(psql -X -At "$PGURL/postgres" -c "SELECT extract(epoch FROM clock_timestamp() + interval '2 s')")
  for ((s=0; s<SHARDS; s++)); do
    { echo "SELECT pg_sleep_until(to_timestamp($start));"
      "$what" "$s"
      echo "SELECT extract(epoch FROM clock_timestamp());"
    } | psql -X -At -q "$PGURL/shard_$s" >"$work/instant-$s.out" &
  done
  wait $(jobs -p | grep -v "^${pids[0]}$") 2>/dev/null || true
  last=$(cat "$work"/instant-*.out | grep -E '^[0-9.]+$' | sort -n | tail -1)
  took=$(awk -v a="$last" -v b="$start" 'BEGIN {printf "%.1f", (a - b) * 1000}')
}
commit_floor() { local t; for ((t=1; t<=TENANTS; t++)); do echo "COMMIT PREPARED 'floor_${1}_${t}';"; done; }
nothing() { :; }

# PostgreSQL's own floor for the second leg: the same number of prepared transactions
# (one per tenant, each holding an ALTER TABLE's ACCESS EXCLUSIVE lock, as the plan's do),
# committed by one session per shard database (as each agent does) that all start at one
# instant (pg_sleep_until), timed from that instant to the last COMMIT PREPARED done.
floors=(); wakes=()
for ((r=1; r<=REPEAT; r++)); do
  bench_reset_fleet "$SHARDS"
  for ((s=0; s<SHARDS; s++)); do
    for ((t=1; t<=TENANTS; t++)); do
      printf "BEGIN; ALTER TABLE tenant_%04d.work_orders ADD COLUMN floor_probe int; PREPARE TRANSACTION 'floor_%s_%s';\n" "$((s * TENANTS + t - 1))" "$s" "$t"
    done | psql -X -q "$PGURL/shard_$s" >/dev/null
  done
  at_one_instant commit_floor; floor=$took
  floors+=("$floor")
  # The same sessions started the same way with nothing to commit: what waking that many
  # sessions (and their psql clients) at one instant takes on this machine by itself. On
  # the 2-core reference machine 16 of them took 13-29 ms, a session alone 1-5 ms: that
  # much of the floor above is the machine waking processes, as the agents must too.
  at_one_instant nothing; wake=$took
  wakes+=("$wake")
  echo "floor run $r: $((SHARDS * TENANTS)) COMMIT PREPAREDs, one session per shard database, all started at once: ${floor} ms; the same sessions with nothing to commit: ${wake} ms"
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
echo "==== $SHARDS shards x $TENANTS tenants, $REPEAT runs, medians (machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)):"
echo "     (a) decision latency, last PREPARE -> decision in etcd -> last COMMIT PREPARED: $(median "${decisions[@]}") ms (goal < 20 ms)"
echo "         of which: decision -> the last agent has it $(median "${heards[@]}") ms; then the agents' COMMIT PREPAREDs until the last is done $(median "${pg_commits[@]}") ms"
echo "         PostgreSQL's floor for that leg ($((SHARDS * TENANTS)) COMMIT PREPAREDs, $SHARDS sessions started at once): $(median "${floors[@]}") ms; Flotilla's leg / floor: $(awk -v a="$(median "${pg_commits[@]}")" -v b="$(median "${floors[@]}")" 'BEGIN {printf "%.2f", a / b}')x"
echo "         of the floor, waking those $SHARDS sessions at one instant with nothing to commit: $(median "${wakes[@]}") ms"
echo "     (b) lock hold per target, PREPARE -> COMMIT PREPARED: median $(median "${holds_median[@]}") ms, p99 $(median "${holds_p99[@]}") ms, max $(median "${holds_max[@]}") ms"
echo "         the slowest target's steps $(median "${slowest[@]}") ms; the longest hold beyond them $(median "${beyond[@]}") ms (goal < 100 ms)"
echo "         each target's locks from its steps' start to its COMMIT PREPARED: median $(median "${locked_median[@]}") ms, max $(median "${locked_max[@]}") ms"
echo "     (c) window, first PREPARE -> last COMMIT PREPARED: $(median "${windows[@]}")s"
echo "     (d) submit -> plan ended (preflight, every target's DDL, PREPARE, decision, COMMIT PREPARED): $(median "${walls[@]}")s"
echo "     (e) peak shared lock table $(median "${peaks_locks[@]}") entries (pg_locks off the fast path), peak prepared $(median "${peaks_prepared[@]}") of max_prepared_transactions $MAX_PREPARED (sampled every 0.2 s)"
echo "     server: $settings"
