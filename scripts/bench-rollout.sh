#!/usr/bin/env bash
# Rollout benchmark (issues 2 and 15): the coordinated example COORD-2025-001 across the
# reference fleet (4 shard databases x 250 tenant schemas = 1,000 tenants) with parallelism 8,
# against the floor (the same SQL through 8 bare psql sessions, no tracking) and, when dbmate
# is on PATH, dbmate once per tenant. Everything runs against one throwaway PostgreSQL server
# started here, in the same run; each contender gets a freshly reset fleet.
# Waves (issue 10) must not cost speed: the same plan in three waves (canary 1%, 25%, the
# rest; no bake, no gate) runs too, and its ratio to the floor is printed beside the plain one.
# Each Flotilla run submits once its agents' start-up inventory is in (every target's schema
# fingerprint at the coordinator; agents run for weeks, so their start-up is not the plan's)
# and the pooled sessions it used have closed (each shard then holds only its agent's lock
# session, as between plans), and prints how long each took. Every Flotilla run also reports what scale costs (issue 15): the coordinator's and the
# agents' peak RSS (VmHWM at the end of the run), the time from submit to the first step
# (the earliest journal row's start in any shard), and `plan status` answer times sampled
# during the rollout (whole CLI invocations), with the coordinator's own time for the
# statuses it answered (its flotilla_plan_status_seconds, scraped from --metrics).
#
#   scripts/bench-rollout.sh [REPEAT]            (default 3; prints the median of each)
#   scripts/bench-rollout.sh --scale [REPEAT]    10,000 tenants: 4 x 2500 tenants, 5 rows each,
#                                                no waves run, and the scale goals printed
#
# Environment: SHARED (default ../shared beside the repo), SHARDS (4), TENANTS (250), ROWS (200),
# PAR (8), WAVES (1: also run the waves plan; 0: not), BASELINE_BIN (another build, e.g. of
# the main branch: each repeat also runs it, in alternating order with this one, and the
# ratio of the two is printed pair by pair), FLOTILLA_PG_BINDIR (else pg_config
# --bindir / newest /usr/lib/postgresql/*/bin), FLOTILLA_BENCH_KEEP=1 keeps the logs and the
# server's data dir.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
SCALE=0
if [ "${1:-}" = "--scale" ]; then
  SCALE=1; shift
  SHARDS=${SHARDS:-4}; TENANTS=${TENANTS:-2500}; ROWS=${ROWS:-5}; WAVES=${WAVES:-0}
fi
REPEAT=${1:-3}
SHARDS=${SHARDS:-4}; TENANTS=${TENANTS:-250}; ROWS=${ROWS:-200}; PAR=${PAR:-8}; WAVES=${WAVES:-1}
source scripts/bench-lib.sh

bench_init flotilla-bench
bench_build
# Default durability settings: both contenders pay the same commit cost.
bench_start_pg -c max_locks_per_transaction=256

echo "==== building the reference fleet: $SHARDS shards x $TENANTS tenants x $ROWS rows"
"$BENCH/make-fleet.sh" "$SHARDS" "$TENANTS" "$ROWS" >/dev/null

# Times `plan status` of the plan the submit log names, every half second until the submit
# ends (each a whole CLI process: connect, ask, render); one line of seconds per answer.
sample_status() {
  local submit_log=$1 out=$2 submit_pid=$3 id="" s e TIMEFORMAT='%U %S'
  while kill -0 "$submit_pid" 2>/dev/null; do
    [ -n "$id" ] || id=$(sed -n 's/^plan \(.*\) submitted$/\1/p' "$submit_log" 2>/dev/null | head -1)
    if [ -n "$id" ]; then
      s=$(now)
      # each sample's CPU (user and system seconds) goes to $out.cpu: the benchmark's own
      # processes take the same cores as the rollout it times
      { time "$FLOTILLA" --coordinator "$addr" plan status "$id" >/dev/null 2>&1 || true; } 2>>"$out.cpu"
      e=$(now)
      kill -0 "$submit_pid" 2>/dev/null && echo "$e - $s" | bc >>"$out"
    fi
    sleep 0.5
  done
}

# The coordinator's own time for the plan statuses it answered during the run (its
# flotilla_plan_status_seconds: the sampled `plan status` calls and the submit's watch), apart
# from the CLI process each sample also times. Sets R_STATUS_COORD (text) and adds to
# STATUS_COORD_N and STATUS_COORD_SLOW (answers, and those over 0.1 s).
coordinator_status_times() {
  local h n sum fast
  h=$(curl -s "http://$1/metrics" 2>/dev/null | histogram_of flotilla_plan_status_seconds)
  read -r n sum _ <<<"$h"
  if [ "$n" = 0 ]; then R_STATUS_COORD="not served (build without the metric)"; return; fi
  fast=$(tr ' ' '\n' <<<"$h" | awk -F: '$1 == "0.1" {print $2}')
  R_STATUS_COORD=$(awk -v n="$n" -v s="$sum" -v f="$fast" 'BEGIN {printf "%d answers, mean %.1f ms, %d over 0.1 s", n, 1000 * s / n, n - f}')
  STATUS_COORD_N=$(( STATUS_COORD_N + n )); STATUS_COORD_SLOW=$(( STATUS_COORD_SLOW + n - fast ))
}
STATUS_COORD_N=0; STATUS_COORD_SLOW=0

# The leader's engine events that took over 0.05 s in the run, by kind (its
# flotilla_engine_event_seconds): a plan status waits behind whatever event the engine is on,
# so these say why an answer was slow. Sets R_SLOW_EVENTS ("none", or "kind count, ...").
coordinator_slow_events() {
  R_SLOW_EVENTS=$(bench_slow_events 0.05 "" "$(curl -s "http://$1/metrics" 2>/dev/null)")
}

# One Flotilla run on a freshly reset fleet: coordinator, one agent per shard, the plan at $3
# submitted with --wait. Sets R_T (seconds), R_FIRST (submit to first step, seconds), R_STATUS
# and R_STATUS_MAX (median and max `plan status` seconds), R_COORD_RSS and R_AGENT_RSS (MB,
# the largest agent); its lines go to stderr.
run_flotilla() {
  local r=$1 label=$2 plan=$3 start end applied first off=0 sub pg0
  bench_reset_fleet "$SHARDS"
  [ "$label" = waves ] && off=1
  [ "$label" = base ] && off=2
  local maddr="127.0.0.1:$(( port + 501 + r * 3 + off ))"
  bench_coordinator $(( port + 1 + r * 3 + off )) "$work/coordinator-$label-$r.log" "$work/store-$label-$r.db" "$maddr"
  bench_agents "$label-$r"
  bench_wait_connected
  bench_wait_inventory $(( SHARDS * TENANTS ))
  bench_wait_agent_sessions "$SHARDS"
  pg0=$(pg_cpu_seconds); pgsys0=$(pg_cpu_split | awk '{print $2}')
  local slog="$work/submit-$label-$r.log" samples="$work/status-$label-$r.txt"
  : >"$samples"; : >"$samples.cpu"
  local t0 t1 c0 a0
  c0=$(bench_cpu_seconds "$COORD_PID"); a0=$(for p in "${AGENT_PIDS[@]}"; do bench_cpu_seconds "$p"; done | awk '{s += $1} END {print s}')
  t0=$(machine_ticks)
  start=$(now)
  # the submit, which follows the plan to its end (a status each time it changes, at most
  # every 100 ms), timed for its CPU as the samples are
  ( TIMEFORMAT='%U %S'
    { time "$FLOTILLA" --coordinator "$addr" plan submit "$plan" --wait --max-parallel "$PAR" >"$slog" 2>&1; } 2>"$slog.cpu"
  ) &
  sub=$!
  sample_status "$slog" "$samples" "$sub" &
  local sampler=$!
  wait "$sub" || { echo "error: flotilla ($label) run failed:" >&2; cat "$slog" >&2; exit 1; }
  end=$(now)
  # The server's CPU up to the plan's end (live backends read, ended ones reaped into the
  # postmaster's): what the floor's figure compares with. After the end the agents read the
  # fingerprints they deferred while runs were busy; that goes only into the figure to the
  # agents' stop.
  R_PG_CPU_PLAN=$(echo "$(pg_cpu_seconds) - $pg0" | bc)
  R_PG_SYS_PLAN=$(echo "$(pg_cpu_split | awk '{print $2}') - $pgsys0" | bc)
  t1=$(machine_ticks)
  # Where the cores went during the run: Flotilla's own processes, and the machine as a
  # whole (PostgreSQL's backends are most of the rest).
  R_COORD_CPU=$(echo "$(bench_cpu_seconds "$COORD_PID") - $c0" | bc)
  R_AGENT_CPU=$(echo "$(for p in "${AGENT_PIDS[@]}"; do bench_cpu_seconds "$p"; done | awk '{s += $1} END {print s}') - $a0" | bc)
  R_BUSY=$(echo "$t0 $t1" | awk '{printf "%.0f", 100 * ($3 - $1) / ($4 - $2)}')
  wait "$sampler" 2>/dev/null || true
  R_T=$(echo "$end - $start" | bc)
  R_SUBMIT_CPU=$(awk '{s += $1 + $2} END {printf "%.2f", s}' "$slog.cpu")
  R_SAMPLES_CPU=$(awk '{s += $1 + $2} END {printf "%.2f", s}' "$samples.cpu")
  coordinator_status_times "$maddr"
  coordinator_slow_events "$maddr"
  R_COORD_RSS=$(peak_rss_mb "$COORD_PID")
  R_AGENT_RSS=$(for p in "${AGENT_PIDS[@]}"; do peak_rss_mb "$p"; done | sort -n | tail -1)
  first=$(for ((s=0; s<SHARDS; s++)); do
    psql "$PGURL/shard_$s" -XAtc "SELECT extract(epoch FROM min(started_at)) FROM flotilla.journal"
  done | grep . | sort -n | head -1)
  R_FIRST=$(printf '%.3f' "$(echo "$first - $start" | bc)")
  # and from the last step's commit (the latest journal row's finish) to the submit's end:
  # the coordinator's own tail (results batched, stored, the plan settled, the watch told)
  last=$(for ((s=0; s<SHARDS; s++)); do
    psql "$PGURL/shard_$s" -XAtc "SELECT extract(epoch FROM max(finished_at)) FROM flotilla.journal"
  done | grep . | sort -n | tail -1)
  R_TAIL=$(printf '%.3f' "$(echo "$end - $last" | bc)")
  if [ -s "$samples" ]; then
    R_STATUS=$(median <"$samples"); R_STATUS_MAX=$(sort -n "$samples" | tail -1)
  else
    R_STATUS="?"; R_STATUS_MAX="?"
  fi
  printf 'run %s: flotilla %-6s %ss   (agents'"'"' start-up inventory %ss before, its sessions closed %ss after, not counted)   first step after %ss, last step to the end %ss; plan status %ss (max %ss, %s samples; at the coordinator %s); peak RSS coordinator %s MB, agent %s MB; CPU coordinator %s s, agents %s s, the submit'"'"'s watch %s s, the status samples %s s, machine %s%% busy   (%s)\n' \
    "$r" "$label" "$R_T" "$R_INVENTORY" "$R_SESSIONS_CLOSED" "$R_FIRST" "$R_TAIL" "$R_STATUS" "$R_STATUS_MAX" "$(wc -l <"$samples")" "$R_STATUS_COORD" "$R_COORD_RSS" "$R_AGENT_RSS" \
    "$R_COORD_CPU" "$R_AGENT_CPU" "$R_SUBMIT_CPU" "$R_SAMPLES_CPU" "$R_BUSY" "$(tail -1 "$slog" | head -c 100)" >&2
  # The coordinator's own view: from the plan stored to its final state.
  awk '/plan submitted/ {s=$1} /every step applied/ {e=$1} END {printf "        coordinator: submitted " s ", finished " e}' "$work/coordinator-$label-$r.log" >&2
  echo "; engine events over 0.05 s: $R_SLOW_EVENTS" >&2
  applied=$(psql "$PGURL/shard_0" -XAtc "SELECT count(*) FROM flotilla.journal")
  [ "$applied" -eq $(( TENANTS * 3 )) ] || { echo "error: shard_0 journal holds $applied rows, expected $(( TENANTS * 3 ))" >&2; exit 1; }
  bench_stop_flotilla
  # the agents' sessions end with them; the postmaster reaps their backends
  pg_wait_sessions_closed
  R_PG_CPU=$(echo "$(pg_cpu_seconds) - $pg0" | bc)
  echo "        PostgreSQL CPU for this run: submit to the plan's end $R_PG_CPU_PLAN s (the kernel's part $R_PG_SYS_PLAN s), to the agents' stop $R_PG_CPU s" >&2
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

floor_times=(); flotilla_times=(); waves_times=(); dbmate_times=(); base_times=(); base_ratios=()
# The baseline build's plain run (BASELINE_BIN): the same fleet, reset, the same plan.
run_baseline() {
  local mine=$FLOTILLA
  FLOTILLA=$BASELINE_BIN
  run_flotilla "$1" base "$BENCH/coord-2025-001"
  FLOTILLA=$mine
  base_times+=("$R_T")
}
firsts=(); statuses=(); status_maxes=(); coord_rss=(); agent_rss=(); floor_cpus=(); plan_cpus=()
for ((r=1; r<=REPEAT; r++)); do
  bench_reset_fleet "$SHARDS"
  f0=$(pg_cpu_seconds); fsys0=$(pg_cpu_split | awk '{print $2}')
  t=$("$BENCH/baseline-psql-floor.sh" "$SHARDS" "$TENANTS" "$PAR" | awk '/seconds/ {print $NF}')
  pg_wait_sessions_closed
  floor_cpu=$(echo "$(pg_cpu_seconds) - $f0" | bc); floor_cpus+=("$floor_cpu")
  floor_sys=$(echo "$(pg_cpu_split | awk '{print $2}') - $fsys0" | bc)
  floor_times+=("$t"); echo "run $r: psql floor   ${t}s   PostgreSQL CPU $floor_cpu s (the kernel's part $floor_sys s)"

  # with a baseline build, which of the two goes first alternates
  if [ -n "${BASELINE_BIN:-}" ] && (( r % 2 == 0 )); then run_baseline "$r"; fi
  run_flotilla "$r" plain "$BENCH/coord-2025-001"
  flotilla_times+=("$R_T"); plan_cpus+=("$R_PG_CPU_PLAN"); firsts+=("$R_FIRST"); statuses+=("$R_STATUS"); status_maxes+=("$R_STATUS_MAX")
  coord_rss+=("$R_COORD_RSS"); agent_rss+=("$R_AGENT_RSS")
  if [ -n "${BASELINE_BIN:-}" ] && (( r % 2 == 1 )); then run_baseline "$r"; fi
  if [ -n "${BASELINE_BIN:-}" ]; then
    base_ratios+=("$(echo "${flotilla_times[-1]} / ${base_times[-1]}" | bc -l)")
  fi
  if [ "$WAVES" = 1 ]; then
    run_flotilla "$r" waves "$work/waves/plan.toml"
    waves_times+=("$R_T")
  fi

  if command -v dbmate >/dev/null 2>&1; then
    bench_reset_fleet "$SHARDS"
    t=$("$BENCH/baseline-dbmate.sh" "$SHARDS" "$TENANTS" "$PAR" | awk '/seconds/ {print $NF}')
    dbmate_times+=("$t"); echo "run $r: dbmate       ${t}s"
  fi
done

floor=$(printf '%s\n' "${floor_times[@]}" | median)
flot=$(printf '%s\n' "${flotilla_times[@]}" | median)
max_of() { printf '%s\n' "$@" | grep -v '?' | sort -n | tail -1; }
goal=1.10; [ "$SCALE" = 1 ] && goal=1.20
echo
echo "==== results (median of $REPEAT; $SHARDS x $TENANTS tenants x $ROWS rows, parallelism $PAR)"
echo "psql floor:  ${floor}s"
echo "flotilla:    ${flot}s"
printf 'flotilla/floor: %.2fx (goal: at most %sx)\n' "$(echo "$flot / $floor" | bc -l)" "$goal"
fcpu=$(printf '%s\n' "${floor_cpus[@]}" | median); pcpu=$(printf '%s\n' "${plan_cpus[@]}" | median)
printf 'PostgreSQL CPU: floor %s s, flotilla %s s (submit to the plan'"'"'s end): %.2fx\n' "$fcpu" "$pcpu" "$(echo "$pcpu / $fcpu" | bc -l)"
echo "submit to first step: $(printf '%s\n' "${firsts[@]}" | median)s median, $(max_of "${firsts[@]}")s max (goal: under 1 s)"
echo "plan status during the rollout: $(printf '%s\n' "${statuses[@]}" | grep -v '?' | median)s median of the runs' medians, $(max_of "${status_maxes[@]}")s slowest answer (goal: under 0.1 s)"
echo "plan status at the coordinator (every run of a build that times it): $STATUS_COORD_N answers, $STATUS_COORD_SLOW over 0.1 s (each sample above is a whole CLI process: start, connect, ask, render)"
echo "peak RSS: coordinator $(max_of "${coord_rss[@]}") MB, largest agent $(max_of "${agent_rss[@]}") MB, the largest of the runs (goals: under 200 MB, under 100 MB)"
if [ "$WAVES" = 1 ]; then
  wav=$(printf '%s\n' "${waves_times[@]}" | median)
  echo "flotilla in 3 waves (1%, 25%, rest): ${wav}s"
  printf 'waves/floor: %.2fx; waves/plain: %.2fx (goal: within 10%% of the plain plan)\n' \
    "$(echo "$wav / $floor" | bc -l)" "$(echo "$wav / $flot" | bc -l)"
fi
if [ -n "${BASELINE_BIN:-}" ]; then
  echo "baseline build ($BASELINE_BIN): $(printf '%s\n' "${base_times[@]}" | median)s"
  printf 'flotilla/baseline build, pair by pair: median %.3fx (each: %s)\n' \
    "$(printf '%s\n' "${base_ratios[@]}" | median)" "$(printf '%.2f ' "${base_ratios[@]}")"
fi
if [ ${#dbmate_times[@]} -gt 0 ]; then
  dbm=$(printf '%s\n' "${dbmate_times[@]}" | median)
  echo "dbmate:      ${dbm}s"
  printf 'flotilla/dbmate: %.3fx\n' "$(echo "$flot / $dbm" | bc -l)"
else
  echo "dbmate:      not installed (npm install -g dbmate to include it)"
fi
