#!/usr/bin/env bash
# Data-migration benchmarks (issue 4), on one table of ROWS (default 1,000,000) rows in one
# shard database, everything on one throwaway PostgreSQL server:
#
#   1. throughput, unthrottled: Flotilla's batched backfill (batch 1000, no rate limit)
#      against the seed's DO-loop (the priority-score backfill of the design seeds, same batch
#      size, its pg_sleep removed), and against a keyset DO-loop that commits every batch
#      (the fairest hand-written floor);
#   2. rate: the backfill at RATE rows/s; the rate achieved over WINDOW seconds, measured from
#      the shard's own checkpoint rows and commit times;
#   3. a foreground pgbench workload's p99 latency alone and while the backfill runs with
#      health throttling on (active sessions and lock waits).
#
# The throughput runs the keyset DO-loop and Flotilla REPEAT times each, in turns (paired on
# the same server in the same minutes), and prints the medians and their ratio; the goal is
# Flotilla at least as fast as the keyset loop (>= 1.0x). SECTIONS picks the parts (default 123);
# SEED=0 skips the seed's DO-loop (minutes: it rescans the table from the start every batch).
#
#   scripts/bench-data.sh            ROWS=200000 WINDOW=20 scripts/bench-data.sh  (quicker)
#   REPEAT=5 SECTIONS=1 SEED=0 scripts/bench-data.sh   (throughput only, medians of 5)
#   BASELINE_BIN=path REPEAT=5 SECTIONS=1 SEED=0 scripts/bench-data.sh
#       (an A/B: that build's Flotilla, on a coordinator and agent of its own, timed in the
#       same turns, after the keyset loop and before this build)
#   PRIOR_IMAGE=1 REPEAT=5 SECTIONS=1 SEED=0 scripts/bench-data.sh
#       (this build's backfill saves a prior image of the columns it changes, before and
#       after each batch, so that its undo can restore them: what that costs against the
#       same keyset loop, which saves nothing; the images are cleared between runs)
#   PROFILE=1 REPEAT=1 SECTIONS=1 SEED=0 scripts/bench-data.sh
#       (where a batch's time goes: pg_stat_statements, with planning and the statements
#       inside functions, after the last keyset run and the last Flotilla run; its own
#       overhead makes those runs' times no figure to quote)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
ROWS=${ROWS:-1000000}; RATE=${RATE:-5000}; WINDOW=${WINDOW:-60}; PGBENCH_SECS=${PGBENCH_SECS:-30}
REPEAT=${REPEAT:-3}; SECTIONS=${SECTIONS:-123}
bindir=$(pg_config --bindir 2>/dev/null || true)
[ -x "$bindir/initdb" ] || bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5,5 -rn | head -1)
[ -x "$bindir/pgbench" ] || { echo "error: pgbench not found next to initdb ($bindir)" >&2; exit 2; }

# FLOTILLA_BIN: time another build (an A/B against an older binary) instead of building this one
if [ -n "${FLOTILLA_BIN:-}" ]; then FLOTILLA=$FLOTILLA_BIN; else
  cargo build --release --quiet --bin flotilla; FLOTILLA=$ROOT/target/release/flotilla
fi
work=$(mktemp -d /tmp/flotilla-data.XXXXXX); chmod 755 "$work"
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
profile_opts=""
[ -z "${PROFILE:-}" ] || profile_opts="-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all -c pg_stat_statements.track_planning=on"
"${as_pg[@]}" "$bindir/pg_ctl" -D "$work/data" -l "$work/pg.log" -w \
  -o "-p $port -k $work -c listen_addresses=127.0.0.1 -c max_connections=100 -c shared_buffers=512MB $profile_opts" start >/dev/null
PGURL="postgres://postgres@127.0.0.1:$port"
psql() { "$bindir/psql" -X -q -v ON_ERROR_STOP=1 "$PGURL/bench" "$@"; }
"$bindir/psql" -X -q "$PGURL/postgres" -c "CREATE DATABASE bench"
[ -z "${PROFILE:-}" ] || psql -c "CREATE EXTENSION pg_stat_statements"
# PROFILE=1: statements run about once per batch or more, by time (mean per call, in ms;
# `plans`: how often it was planned, once for a cached generic plan)
profile_reset() { [ -z "${PROFILE:-}" ] || psql -c "SELECT pg_stat_statements_reset()" >/dev/null; }
profile_print() {
  [ -z "${PROFILE:-}" ] || psql -c "SELECT calls, round(mean_exec_time::numeric, 3) AS exec_ms,
    round((total_plan_time / calls)::numeric, 3) AS plan_ms, plans, left(regexp_replace(query, '\s+', ' ', 'g'), 100) AS statement
    FROM pg_stat_statements WHERE calls >= $ROWS / 1000 - 1 AND query NOT LIKE 'DO %'
    ORDER BY total_exec_time + total_plan_time DESC LIMIT 12"
}

echo "==== building work_orders with $ROWS rows"
psql <<SQL
CREATE TABLE work_orders (id bigserial PRIMARY KEY, customer_id bigint NOT NULL, priority text NOT NULL,
  total_amount numeric(12,2) NOT NULL, priority_score int NOT NULL DEFAULT 0, updated_at timestamptz);
INSERT INTO work_orders (customer_id, priority, total_amount)
  SELECT g % 9973, (ARRAY['emergency','urgent','high','normal','low'])[1 + g % 5], g % 1000 + 0.5
  FROM generate_series(1, $ROWS) g;
VACUUM ANALYZE work_orders;
SQL
reset_table() { psql -c "UPDATE work_orders SET priority_score = 0, updated_at = NULL" -c "VACUUM ANALYZE work_orders" -c "CHECKPOINT"; }
SCORE="CASE WHEN priority = 'emergency' THEN 100 WHEN priority = 'urgent' THEN 80 WHEN priority = 'high' THEN 60 WHEN priority = 'normal' THEN 40 WHEN priority = 'low' THEN 20 ELSE 0 END"
now() { date +%s.%N; }

# --- the coordinator and the shard's agent ---------------------------------------------
cport=$(( port + 1 )); addr="http://127.0.0.1:$cport"
FLOTILLA_LOG=warn "$FLOTILLA" coordinator --listen "127.0.0.1:$cport" --store "$work/store.db" >"$work/c.log" 2>&1 &
pids+=($!)
# One agent per shard database (it holds the database's agent lock): with BASELINE_BIN, the
# agent of the build whose turn it is runs, the other's is stopped (and its lock gone).
agent_pid=""
start_agent() { # $1 binary, $2 coordinator address
  FLOTILLA_LOG=warn "$1" --coordinator "$2" agent --shard shard_0 --dsn "$PGURL/bench" >>"$work/a.log" 2>&1 &
  agent_pid=$!; pids+=($agent_pid)
  for ((i=0; i<300; i++)); do
    "$1" --coordinator "$2" fleet list --output json 2>/dev/null | grep -q '"connected":true' && return 0; sleep 0.1
  done
  echo "error: the agent of $2 did not connect" >&2; exit 1
}
stop_agent() {
  kill "$agent_pid"; wait "$agent_pid" 2>/dev/null || true
  for ((i=0; i<300; i++)); do
    [ "$(psql -At -c "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted")" = 0 ] && return 0; sleep 0.1
  done
  echo "error: the stopped agent's lock is still held" >&2; exit 1
}
start_agent "$FLOTILLA" "$addr"
if [ -n "${BASELINE_BIN:-}" ]; then
  # the baseline's own coordinator, with its own store: the same epoch as the other's, so
  # neither fences the other out of the shard
  addr_b="http://127.0.0.1:$(( port + 2 ))"
  FLOTILLA_LOG=warn "$BASELINE_BIN" coordinator --listen "127.0.0.1:$(( port + 2 ))" --store "$work/store-b.db" >"$work/c-b.log" 2>&1 &
  pids+=($!)
fi
n=0
# A migration directory with one data migration ($dir, its id $mid); extra [data] lines in $1.
backfill_dir() {
  n=$((n + 1)); mid="$(printf '2025020100%04d' "$n")_priority_score"; dir="$work/m$n"; local d="$dir/$mid"
  mkdir -p "$d"
  printf 'SELECT 1;\n' > "$d/up.sql"
  printf 'UPDATE work_orders SET priority_score = 0;\n' > "$d/down.sql"
  cat > "$d/migration.toml" <<TOML
scope = "shard"
[data]
table = "work_orders"
key = "id"
batch_size = 1000
filter = "priority_score = 0"
batch = "UPDATE work_orders SET priority_score = $SCORE, updated_at = now() WHERE id > \$1 AND id <= \$2"
$1
TOML
}
check_done() {
  local left; left=$(psql -At -c "SELECT count(*) FROM work_orders WHERE priority_score = 0")
  [ "$left" -eq 0 ] || { echo "error: $left rows not backfilled" >&2; exit 1; }
}

# --- 1. throughput ------------------------------------------------------------------------
median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
if [[ $SECTIONS == *1* ]]; then
echo "==== 1. unthrottled throughput, batch 1000 (keyset loop and Flotilla $REPEAT times each, in turns)"
if [ "${SEED:-1}" = 1 ]; then
reset_table
t0=$(now)
psql <<SQL
DO \$\$
DECLARE batch_size INTEGER := 1000; processed_count INTEGER := 0;
BEGIN
  LOOP
    UPDATE work_orders SET priority_score = $SCORE, updated_at = now()
    WHERE priority_score = 0 AND id IN (SELECT id FROM work_orders WHERE priority_score = 0 ORDER BY id LIMIT batch_size);
    GET DIAGNOSTICS processed_count = ROW_COUNT;
    EXIT WHEN processed_count = 0;
  END LOOP;
END \$\$;
SQL
t_seed=$(echo "$(now) - $t0" | bc); check_done
echo "seed DO-loop (one transaction, rescans from the start each batch): ${t_seed}s"
else t_seed=0; fi

keysets=(); flotillas=(); baselines=()
for ((r=1; r<=REPEAT; r++)); do
  reset_table
  profile_reset
  t0=$(now)
  psql <<SQL
DO \$\$
DECLARE last_id bigint := 0; upper_id bigint;
BEGIN
  LOOP
    SELECT max(id) INTO upper_id FROM (SELECT id FROM work_orders WHERE id > last_id AND priority_score = 0 ORDER BY id LIMIT 1000) p;
    EXIT WHEN upper_id IS NULL;
    UPDATE work_orders SET priority_score = $SCORE, updated_at = now() WHERE id > last_id AND id <= upper_id;
    last_id := upper_id;
    COMMIT;
  END LOOP;
END \$\$;
SQL
  t=$(echo "$(now) - $t0" | bc); check_done; keysets+=("$t")
  echo "run $r: keyset DO-loop (a commit per batch): ${t}s"
  [ "$r" -lt "$REPEAT" ] || profile_print

  if [ -n "${BASELINE_BIN:-}" ]; then
    stop_agent; start_agent "$BASELINE_BIN" "$addr_b"
    reset_table
    backfill_dir ""
    t0=$(now)
    "$BASELINE_BIN" --coordinator "$addr_b" plan submit "$dir" --wait --output json >"$work/p1.json"
    t=$(echo "$(now) - $t0" | bc); check_done; baselines+=("$t")
    echo "run $r: baseline Flotilla ($BASELINE_BIN): ${t}s"
    stop_agent; start_agent "$FLOTILLA" "$addr"
  fi

  reset_table
  if [ "${PRIOR_IMAGE:-0}" = 1 ]; then
    psql -c "TRUNCATE flotilla.prior_images" -c "CHECKPOINT" >/dev/null
    backfill_dir 'prior_image = ["priority_score", "updated_at"]'
  else
    backfill_dir ""
  fi
  profile_reset
  t0=$(now)
  "$FLOTILLA" --coordinator "$addr" plan submit "$dir" --wait --output json >"$work/p1.json"
  t=$(echo "$(now) - $t0" | bc); check_done; flotillas+=("$t")
  echo "run $r: Flotilla (keyset batches, each with its checkpoint, fenced, progress on${PRIOR_IMAGE:+, prior image saved}): ${t}s"
  [ "$r" -lt "$REPEAT" ] || profile_print
done
t_keyset=$(printf '%s\n' "${keysets[@]}" | median)
t_flotilla=$(printf '%s\n' "${flotillas[@]}" | median)
printf '==== throughput (medians of %d): keyset DO-loop %.2fs, Flotilla %.2fs = %.0f rows/s\n' \
  "$REPEAT" "$t_keyset" "$t_flotilla" "$(echo "$ROWS / $t_flotilla" | bc -l)"
[ "$t_seed" = 0 ] || printf '==== Flotilla vs the seed DO-loop: %.2fx its speed\n' "$(echo "$t_seed / $t_flotilla" | bc -l)"
printf '==== Flotilla vs the keyset DO-loop: %.2fx its speed (goal >= 1.0x)\n' "$(echo "$t_keyset / $t_flotilla" | bc -l)"
# Each run's pair too: both sides speed up or slow down together over the runs (the server's
# caches, the machine), and the medians may then come from different minutes.
pairs=()
for ((i=0; i<${#flotillas[@]}; i++)); do
  pairs+=("$(echo "${keysets[$i]} / ${flotillas[$i]}" | bc -l)")
done
printf '==== pair by pair (the keyset loop'"'"'s time / Flotilla'"'"'s, each run):%s; median %.2fx\n' \
  "$(printf ' %.2fx' "${pairs[@]}")" "$(printf '%s\n' "${pairs[@]}" | median)"
if [ -n "${BASELINE_BIN:-}" ]; then
  t_base=$(printf '%s\n' "${baselines[@]}" | median)
  printf '==== baseline (median of %d): %.2fs, %.2fx the keyset loop'"'"'s speed; this build %.2fx the baseline'"'"'s speed\n' \
    "$REPEAT" "$t_base" "$(echo "$t_keyset / $t_base" | bc -l)" "$(echo "$t_base / $t_flotilla" | bc -l)"
fi
fi

# --- 2. rate --------------------------------------------------------------------------------
sample() { psql -At -F' ' -c "SELECT rows, extract(epoch FROM updated_at) FROM flotilla.checkpoints WHERE migration_id = '$mid'"; }
if [[ $SECTIONS == *2* ]]; then
echo "==== 2. rate limit $RATE rows/s over ${WINDOW}s"
reset_table
backfill_dir "rows_per_second = $RATE"
id=$("$FLOTILLA" --coordinator "$addr" plan submit "$dir" --policy stop --output json | tail -1 | grep -o '"plan_id":"[^"]*"' | cut -d'"' -f4)
for ((i=0; i<300; i++)); do s1=$(sample); [ -n "$s1" ] && break; sleep 0.05; done
read -r r1 t1 <<<"$s1"
sleep "$WINDOW"
read -r r2 t2 <<<"$(sample)"
"$FLOTILLA" --coordinator "$addr" plan cancel "$id" --wait --output json >/dev/null || true
achieved=$(echo "($r2 - $r1) / ($t2 - $t1)" | bc -l)
printf '==== rate: %.1f rows/s achieved over %.1fs (%d rows), limit %d: %.2f%% off (goal within 3%%)\n' \
  "$achieved" "$(echo "$t2 - $t1" | bc -l)" "$((r2 - r1))" "$RATE" "$(echo "($achieved - $RATE) / $RATE * 100" | bc -l)"
fi

# --- 3. foreground latency -----------------------------------------------------------------
[[ $SECTIONS == *3* ]] || exit 0
echo "==== 3. pgbench p99 (4 clients, point reads and updates by id, ${PGBENCH_SECS}s)"
cat >"$work/fg.sql" <<SQL
\set id random(1, $ROWS)
SELECT total_amount FROM work_orders WHERE id = :id;
UPDATE work_orders SET total_amount = total_amount + 0 WHERE id = :id;
SQL
p99() { # per-transaction latencies (microseconds, field 3) of pgbench -l logs
  cat "$1"/pgbench_log.* | awk '{print $3}' | sort -n | awk '{a[NR]=$1} END {i=int(NR*0.99); if (i<1) i=1; printf "%.2f", a[i]/1000}'
}
bench() { # $1: log dir
  mkdir -p "$1"; (cd "$1" && "$bindir/pgbench" -n -c 4 -j 2 -T "$PGBENCH_SECS" -f "$work/fg.sql" -l "$PGURL/bench" >"$1/out.txt" 2>&1)
}
reset_table
bench "$work/alone"; alone=$(p99 "$work/alone")
echo "alone: p99 ${alone} ms"
reset_table
backfill_dir "[data.throttle]
max_active_sessions = 2
max_lock_waits = 0"
id=$("$FLOTILLA" --coordinator "$addr" plan submit "$dir" --policy stop --output json | tail -1 | grep -o '"plan_id":"[^"]*"' | cut -d'"' -f4)
for ((i=0; i<300; i++)); do [ -n "$(sample)" ] && break; sleep 0.05; done
rb=$(sample | cut -d' ' -f1)
bench "$work/with"; with=$(p99 "$work/with")
ra=$(sample | cut -d' ' -f1)
"$FLOTILLA" --coordinator "$addr" plan cancel "$id" --wait --output json >/dev/null || true
echo "with the throttled backfill: p99 ${with} ms (the backfill did $(( ${ra:-0} - ${rb:-0} )) rows meanwhile)"
printf '==== p99 ratio: %.2fx (goal <= 1.2x)\n' "$(echo "$with / $alone" | bc -l)"
