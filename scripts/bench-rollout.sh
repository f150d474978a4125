#!/usr/bin/env bash
# Rollout benchmark (issue 2): the coordinated example COORD-2025-001 across the reference
# fleet (4 shard databases x 250 tenant schemas = 1,000 tenants) with parallelism 8, against
# the floor (the same SQL through 8 bare psql sessions, no tracking) and, when dbmate is on
# PATH, dbmate once per tenant. Everything runs against one throwaway PostgreSQL server
# started here, in the same run; each contender gets a freshly reset fleet.
# Waves (issue 10) must not cost speed: the same plan in three waves (canary 1%, 25%, the
# rest; no bake, no gate) runs too, and its ratio to the floor is printed beside the plain one.
#
#   scripts/bench-rollout.sh [REPEAT]        (default 3; prints the median of each)
#
# Environment: SHARED (default ../shared beside the repo), SHARDS (4), TENANTS (250), PAR (8),
# FLOTILLA_PG_BINDIR (else pg_config --bindir / newest /usr/lib/postgresql/*/bin),
# FLOTILLA_BENCH_KEEP=1 keeps the logs and the server's data dir.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
SHARED=${SHARED:-$ROOT/../shared}
BENCH=$SHARED/bench
REPEAT=${1:-3}
SHARDS=${SHARDS:-4}; TENANTS=${TENANTS:-250}; PAR=${PAR:-8}
[ -x "$BENCH/make-fleet.sh" ] || { echo "error: $BENCH/make-fleet.sh not found (set SHARED)" >&2; exit 2; }

bindir=${FLOTILLA_PG_BINDIR:-}
[ -n "$bindir" ] || bindir=$(pg_config --bindir 2>/dev/null || true)
[ -x "$bindir/initdb" ] || bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5,5 -rn | head -1)
[ -x "$bindir/initdb" ] || { echo "error: initdb not found; run scripts/test.sh once to install PostgreSQL" >&2; exit 2; }

echo "==== building flotilla (release)"
cargo build --release --quiet --bin flotilla
FLOTILLA=$ROOT/target/release/flotilla

work=$(mktemp -d /tmp/flotilla-bench.XXXXXX)
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
# Default durability settings: both contenders pay the same commit cost.
"${as_pg[@]}" "$bindir/pg_ctl" -D "$work/data" -l "$work/pg.log" -w \
  -o "-p $port -k $work -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null
export PGURL="postgres://postgres@127.0.0.1:$port"
export PATH="$bindir:$PATH"

echo "==== building the reference fleet: $SHARDS shards x $TENANTS tenants"
"$BENCH/make-fleet.sh" "$SHARDS" "$TENANTS" >/dev/null

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
now() { date +%s.%N; }

# One Flotilla run on a freshly reset fleet: coordinator, one agent per shard, the plan at
# $3 submitted with --wait; prints its seconds (and its log lines on stderr).
run_flotilla() {
  local r=$1 label=$2 plan=$3 cport start end t applied
  "$BENCH/make-fleet.sh" --reset "$SHARDS" >/dev/null
  local off=0
  [ "$label" = waves ] && off=1
  cport=$(( port + 1 + r * 2 + off ))
  "$FLOTILLA" coordinator --listen "127.0.0.1:$cport" --store "$work/store-$label-$r.db" >"$work/coordinator-$label-$r.log" 2>&1 &
  pids+=($!)
  local addr="http://127.0.0.1:$cport"
  for ((i=0; i<100; i++)); do grep -q "coordinator listening" "$work/coordinator-$label-$r.log" && break; sleep 0.1; done
  for ((s=0; s<SHARDS; s++)); do
    FLOTILLA_LOG=warn "$FLOTILLA" --coordinator "$addr" agent --shard "shard_$s" --dsn "$PGURL/shard_$s" \
      --tenant-pattern 'tenant_%' --max-connections "$PAR" >"$work/agent-$label-$r-$s.log" 2>&1 &
    pids+=($!)
  done
  for ((i=0; i<200; i++)); do
    n=$("$FLOTILLA" --coordinator "$addr" fleet list --output json 2>/dev/null | grep -o '"connected":true' | wc -l || true)
    [ "$n" -eq "$SHARDS" ] && break; sleep 0.1
  done
  start=$(now)
  "$FLOTILLA" --coordinator "$addr" plan submit "$plan" --wait --max-parallel "$PAR" >"$work/submit-$label-$r.log" 2>&1 \
    || { echo "error: flotilla ($label) run failed:" >&2; cat "$work/submit-$label-$r.log" >&2; exit 1; }
  end=$(now)
  t=$(echo "$end - $start" | bc)
  printf 'run %s: flotilla %-6s %ss   (%s)\n' "$r" "$label" "$t" "$(tail -1 "$work/submit-$label-$r.log" | head -c 100)" >&2
  # The coordinator's own view: from the plan stored to its final state.
  awk '/plan submitted/ {s=$1} /every step applied/ {e=$1} END {print "        coordinator: submitted " s ", finished " e}' "$work/coordinator-$label-$r.log" >&2
  applied=$(psql "$PGURL/shard_0" -XAtc "SELECT count(*) FROM flotilla.journal")
  [ "$applied" -eq $(( TENANTS * 3 )) ] || { echo "error: shard_0 journal holds $applied rows, expected $(( TENANTS * 3 ))" >&2; exit 1; }
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
  echo "$t"
}

# The same plan in three waves: canary 1%, a quarter, the rest (no bake, no gate).
mkdir -p "$work/waves"
cat >"$work/waves/plan.toml" <<PLAN
name = "coord-2025-001-waves"
migrations_dir = "$BENCH/coord-2025-001"

[[waves]]
name = "canary"
percent = 1

[[waves]]
name = "quarter"
percent = 25

[[waves]]
name = "rest"
rest = true
PLAN

floor_times=(); flotilla_times=(); waves_times=(); dbmate_times=()
for ((r=1; r<=REPEAT; r++)); do
  "$BENCH/make-fleet.sh" --reset "$SHARDS" >/dev/null
  t=$("$BENCH/baseline-psql-floor.sh" "$SHARDS" "$TENANTS" "$PAR" | awk '/seconds/ {print $NF}')
  floor_times+=("$t"); echo "run $r: psql floor   ${t}s"

  t=$(run_flotilla "$r" plain "$BENCH/coord-2025-001")
  flotilla_times+=("$t")
  t=$(run_flotilla "$r" waves "$work/waves/plan.toml")
  waves_times+=("$t")

  if command -v dbmate >/dev/null 2>&1; then
    "$BENCH/make-fleet.sh" --reset "$SHARDS" >/dev/null
    t=$("$BENCH/baseline-dbmate.sh" "$SHARDS" "$TENANTS" "$PAR" | awk '/seconds/ {print $NF}')
    dbmate_times+=("$t"); echo "run $r: dbmate       ${t}s"
  fi
done

floor=$(printf '%s\n' "${floor_times[@]}" | median)
flot=$(printf '%s\n' "${flotilla_times[@]}" | median)
wav=$(printf '%s\n' "${waves_times[@]}" | median)
echo
echo "==== results (median of $REPEAT; $SHARDS x $TENANTS tenants, parallelism $PAR)"
echo "psql floor:  ${floor}s"
echo "flotilla:    ${flot}s"
printf 'flotilla/floor: %.2fx (goal: at most 1.30x)\n' "$(echo "$flot / $floor" | bc -l)"
echo "flotilla in 3 waves (1%, 25%, rest): ${wav}s"
printf 'waves/floor: %.2fx; waves/plain: %.2fx (goal: within 10%% of the plain plan)\n' \
  "$(echo "$wav / $floor" | bc -l)" "$(echo "$wav / $flot" | bc -l)"
if [ ${#dbmate_times[@]} -gt 0 ]; then
  dbm=$(printf '%s\n' "${dbmate_times[@]}" | median)
  echo "dbmate:      ${dbm}s"
  printf 'flotilla/dbmate: %.3fx\n' "$(echo "$flot / $dbm" | bc -l)"
else
  echo "dbmate:      not installed (npm install -g dbmate to include it)"
fi
