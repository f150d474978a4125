#!/usr/bin/env bash
# Many shards on one coordinator (issue 15): COORD-2025-001 (non-atomic) rolled over SIZE
# shard databases x 40 tenant schemas each, for SIZE in 8, 32 and 64, with one agent per
# shard, one coordinator, one etcd and one PostgreSQL server, all started here. For each size
# it prints, medians of REPEAT runs:
#   - the coordinator's CPU per step: the run time of its threads (/proc/PID/task/*/schedstat,
#     in nanoseconds; the 10 ms ticks of /proc/PID/stat if a thread ended in between) from
#     submit to the plan's end, divided by the steps that ran (at 8 shards the rollout takes
#     about 50 ms of the coordinator's CPU: in ticks that figure moved by 40% from run to run);
#   - the scheduling latency: flotilla_scheduling_latency_seconds from the coordinator's
#     /metrics (an agent's results arriving -> the runs they freed handed out), mean and p99,
#     and per run the engine's events over 5 ms by kind (what a slow one waited behind);
#   - the wall time of the rollout (submit --wait) and the steps per second;
#   - the coordinator's idle CPU with every agent attached (heartbeats, liveness), per second;
#   - the same CPU per step beyond the idle CPU (the idle rate times the rollout's length
#     taken off): what the steps cost, apart from what attached agents cost per second
#     whatever they do (heartbeats both ways every second: 64 agents cost the coordinator
#     about 5x the idle CPU of 8, spread over the same steps);
#   - the agents' results messages per step, and the coordinator's CPU per message: an agent
#     sends its results when 4 runs wait (or after 250 ms, or at once when one is urgent), so
#     a message carries about 12 steps at 8 and at 64 shards; with a 25 ms window instead, an
#     agent with one lane (64 shards at PAR 16) sent each run alone (about 3.7 steps against 8)
#     and the CPU per step grew with that.
# The figures should stay flat as the shards grow: the same tenants per shard and the same
# parallelism in all (PAR steps at once, whatever the number of shards), so PostgreSQL and the
# cores do the same work at once and what grows is the fleet the coordinator keeps: agents
# attached, their streams, heartbeats and liveness keys, and the targets of the plan.
#
#   scripts/bench-shards.sh [REPEAT]         (default 3)
#
# Environment: SHARED (default ../shared beside the repo), SIZES ("8 32 64"), TENANTS (40 per
# shard), PAR (16: the plan's --max-parallel), AGENT_CONNS (2: each agent's --max-connections),
# ROWS (20 per table), IDLE (3 s of idle CPU measured before each submit), FLEET_NICE (0: the
# niceness of the agents and PostgreSQL, or idle; see below), FLOTILLA_PG_BINDIR, FLOTILLA_BENCH_KEEP=1
# keeps the logs and the server's data dir.
#
# Why PAR is fixed: with one lane per shard (PAR = SIZE), 64 shards ran 64 DDL transactions at
# once on 2 cores; agents and the coordinator were starved for seconds, missed heartbeats (3 s)
# and reconnected by the dozen, and the coordinator once lost its etcd lease: the machine, not
# the coordinator, was measured. PAR=SIZE still works for a bigger machine.
#
# PostgreSQL settings: an agent holds at most --max-connections + 1 pooled connections and one
# for its agent lock, so 64 agents x (2 + 2) = 256: max_connections=400 leaves room for psql
# and the journal reads. fsync=off: the machine has 2 cores and one disk shared with others,
# and commit latency is not what this measures (the coordinator's cost per step is).
#
# FLEET_NICE=10 runs the agents and PostgreSQL at that niceness, the coordinator and etcd at
# 0: on a fleet they run on the shards' hosts, not on the coordinator's. FLEET_NICE=idle runs
# them at SCHED_IDLE (chrt --idle): they get a core only when the coordinator and etcd do not
# want it, the nearest this machine comes to other hosts. At nice 10 the scheduling latency at
# 64 shards was 0.22 ms mean, p99 5-10 ms, against 0.09-0.10 ms and 0.25-1 ms at 8; at
# SCHED_IDLE 0.08-0.18 ms, p99 <= 1 ms at both (2026-12-05): that growth was the fleet taking
# the coordinator's cores, not the coordinator. Here 64 agents and
# the server share 2 cores with the coordinator, and at the same priority the engine is now
# and then taken off its core in the middle of an event for 25-100 ms
# (flotilla_engine_event_seconds holds a few such results events in a 64-shard run, whose
# work is 0.1-0.4 ms): every result queued behind it waits that long, and the mean latency
# of a run goes from 0.1 ms to 1-3 ms by that alone.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
SHARED=${SHARED:-$ROOT/../shared}
BENCH=$SHARED/bench
REPEAT=${1:-3}
SIZES=${SIZES:-"8 32 64"}
TENANTS=${TENANTS:-40}; PAR=${PAR:-16}; AGENT_CONNS=${AGENT_CONNS:-2}; ROWS=${ROWS:-20}
IDLE=${IDLE:-3}; FLEET_NICE=${FLEET_NICE:-0}
if [ "$FLEET_NICE" = idle ]; then fleet=(chrt --idle 0); else fleet=(nice -n "$FLEET_NICE"); fi
[ -x "$BENCH/make-fleet.sh" ] || { echo "error: $BENCH/make-fleet.sh not found (set SHARED)" >&2; exit 2; }
command -v etcd >/dev/null || { echo "error: etcd not found; run scripts/test.sh once to install it" >&2; exit 2; }
command -v curl >/dev/null || { echo "error: curl not found" >&2; exit 2; }
MAX_SIZE=0
for n in $SIZES; do [ "$n" -gt "$MAX_SIZE" ] && MAX_SIZE=$n; done

bench_median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

# ---- this benchmark -----------------------------------------------------------------------

# The latency between two histogram readings: "mean_ms p99_ms count" (p99: the upper bound
# of the bucket that holds it; count: the observations, here the agents' results messages).
latency_between() {
  awk -v before="$1" -v after="$2" 'BEGIN {
    nb = split(before, B, " "); na = split(after, A, " ")
    n = A[1] - B[1]; sum = A[2] - B[2]
    for (i = 3; i <= nb; i++) { split(B[i], x, ":"); prev[x[1]] = x[2] }
    p99 = "inf"
    for (i = 3; i <= na; i++) {
      split(A[i], x, ":"); c = x[2] - prev[x[1]]
      if (n > 0 && c >= 0.99 * n) { p99 = (x[1] == "+Inf") ? "inf" : sprintf("%.2f", x[1] * 1000); break }
    }
    if (n > 0) printf "%.3f %s %d\n", sum / n * 1000, p99, n; else print "nan nan 0"
  }'
}

# Steps that ran to an end (applied or already there), from the coordinator's counters.
steps_done() {
  awk '/^flotilla_steps_finished_total\{/ && (/outcome="applied"/ || /outcome="already_applied"/) {s += $2} END {print s + 0}'
}

# shellcheck source=scripts/bench-lib.sh
source "$ROOT/scripts/bench-lib.sh"
bench_init flotilla-bench-shards
bench_build
as_pg=("${fleet[@]}" "${as_pg[@]}")
bench_start_pg -c max_connections=400 -c fsync=off -c shared_buffers=256MB
eport=$(( port + 1 ))
bench_etcd_start "$eport" $(( port + 2 ))

echo "==== building $MAX_SIZE shards x $TENANTS tenants x $ROWS rows"
# (its DROP DATABASE IF EXISTS says NOTICE once per database: 128 lines)
PGOPTIONS='-c client_min_messages=warning' "$BENCH/make-fleet.sh" "$MAX_SIZE" "$TENANTS" "$ROWS" >/dev/null

# One rollout over the first $1 shards (freshly reset); writes to $work/result
# "cpu_per_step_ms latency_mean_ms latency_p99_ms wall_s steps_per_s idle_cpu_per_s detached
# steps_per_message cpu_per_message_ms"
# (detached: agent streams the coordinator lost during the run; each one a reconnect, runs
# resent: on a starved machine they are what the latency measures).
run_size() {
  local n=$1 r=$2 cport mport addr cpid
  bench_reset_fleet "$n"
  cport=$(( port + 10 + r * 4 )); mport=$(( cport + 1 ))
  addr="http://127.0.0.1:$cport"
  bench_etcd_forget_store "$eport"
  FLOTILLA_LOG=info "$FLOTILLA" coordinator --listen "127.0.0.1:$cport" --metrics "127.0.0.1:$mport" \
    --store "$work/store-$n-$r.db" --etcd "http://127.0.0.1:$eport" >"$work/c-$n-$r.log" 2>&1 &
  cpid=$!; pids+=("$cpid")
  for ((s=0; s<n; s++)); do
    FLOTILLA_LOG=warn "${fleet[@]}" "$FLOTILLA" --coordinator "$addr" agent --shard "shard_$s" --dsn "$PGURL/shard_$s" \
      --tenant-pattern 'tenant_%' --max-connections "$AGENT_CONNS" --etcd "http://127.0.0.1:$eport" \
      >"$work/a-$n-$r-$s.log" 2>&1 &
    pids+=($!)
  done
  bench_wait_agents "$addr" "$n"
  # Idle: every agent attached, nothing to do (heartbeats, liveness, journal reports).
  local i0 i1 c0 c1 t0 t1 h0 h1 m0 m1
  i0=$(bench_cpu_reading "$cpid"); sleep "$IDLE"; i1=$(bench_cpu_reading "$cpid")
  m0=$(curl -fs "http://127.0.0.1:$mport/metrics")
  h0=$(echo "$m0" | histogram_of flotilla_scheduling_latency_seconds)
  c0=$(bench_cpu_reading "$cpid"); t0=$(date +%s.%N)
  "$FLOTILLA" --coordinator "$addr" plan submit "$BENCH/coord-2025-001" --wait \
    --max-parallel "$PAR" >"$work/submit-$n-$r.log" 2>&1 \
    || { echo "error: the rollout over $n shards failed:" >&2; tail -5 "$work/submit-$n-$r.log" >&2; exit 1; }
  t1=$(date +%s.%N); c1=$(bench_cpu_reading "$cpid")
  m1=$(curl -fs "http://127.0.0.1:$mport/metrics")
  h1=$(echo "$m1" | histogram_of flotilla_scheduling_latency_seconds)
  local steps expected applied
  steps=$(( $(echo "$m1" | steps_done) - $(echo "$m0" | steps_done) ))
  expected=$(( n * TENANTS * 3 ))
  [ "$steps" -eq "$expected" ] || { echo "error: $steps steps ran over $n shards, expected $expected" >&2; exit 1; }
  applied=$(psql "$PGURL/shard_$(( n - 1 ))" -XAtc "SELECT count(*) FROM flotilla.journal")
  [ "$applied" -eq $(( TENANTS * 3 )) ] || { echo "error: shard_$(( n - 1 ))'s journal holds $applied rows, expected $(( TENANTS * 3 ))" >&2; exit 1; }
  local lat detached
  lat=$(latency_between "$h0" "$h1")
  bench_slow_events 0.005 "$m0" "$m1" >"$work/slow"
  detached=$(grep -c "flotilla_coordinator::sessions: agent detached" "$work/c-$n-$r.log" || true)
  awk -v cpu="$(bench_cpu_between "$c0" "$c1")" -v t0="$t0" -v t1="$t1" -v s="$steps" -v lat="$lat" \
      -v idle_cpu="$(bench_cpu_between "$i0" "$i1")" -v idle="$IDLE" -v d="$detached" 'BEGIN {
    split(lat, l, " ")
    busy = cpu - idle_cpu / idle * (t1 - t0)
    printf "%.4f %s %s %.2f %.1f %.4f %d %.2f %.3f %.4f\n", cpu / s * 1000, l[1], l[2], t1 - t0, s / (t1 - t0), idle_cpu / idle, d, s / l[3], cpu / l[3] * 1000, busy / s * 1000
  }' >"$work/result"
  for p in "${pids[@]:1}"; do kill "$p" 2>/dev/null || true; done
  wait "${pids[@]:1}" 2>/dev/null || true
  pids=("${pids[0]}")
}

declare -A cpu lat_mean lat_p99 wall rate idle per_msg cpu_msg busy
for ((r=1; r<=REPEAT; r++)); do
  for n in $SIZES; do
    run_size "$n" "$r"
    read -r c lm lp w sps ic det spm cm cb <"$work/result"
    echo "run $r, $n shards x $TENANTS tenants: coordinator CPU ${c} ms/step (${cb} beyond its idle CPU), ${cm} ms per results message (${spm} steps each); scheduling latency mean ${lm} ms, p99 <= ${lp} ms; wall ${w}s (${sps} steps/s); idle CPU ${ic} s/s; agent streams lost ${det}; engine events over 5 ms: $(cat "$work/slow")"
    cpu[$n]+="$c "; lat_mean[$n]+="$lm "; lat_p99[$n]+="$lp "; wall[$n]+="$w "; rate[$n]+="$sps "; idle[$n]+="$ic "
    per_msg[$n]+="$spm "; cpu_msg[$n]+="$cm "; busy[$n]+="$cb "
  done
done

echo
echo "==== medians of $REPEAT runs; $TENANTS tenants per shard, COORD-2025-001 (3 steps per tenant), max_parallel $PAR, agents --max-connections $AGENT_CONNS, agents and PostgreSQL at $( [ "$FLEET_NICE" = idle ] && echo SCHED_IDLE || echo "nice $FLEET_NICE" )"
echo "     machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), load $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-7s %8s %14s %14s %14s %10s %22s %10s %10s %14s\n' shards steps "CPU/step (ms)" "beyond idle" "CPU/msg (ms)" "steps/msg" "sched. mean/p99 (ms)" "wall (s)" "steps/s" "idle CPU (s/s)"
for n in $SIZES; do
  # shellcheck disable=SC2086
  printf '%-7s %8s %14s %14s %14s %10s %22s %10s %10s %14s\n' "$n" $(( n * TENANTS * 3 )) "$(bench_median ${cpu[$n]})" \
    "$(bench_median ${busy[$n]})" \
    "$(bench_median ${cpu_msg[$n]})" "$(bench_median ${per_msg[$n]})" \
    "$(bench_median ${lat_mean[$n]}) / $(bench_median ${lat_p99[$n]})" "$(bench_median ${wall[$n]})" \
    "$(bench_median ${rate[$n]})" "$(bench_median ${idle[$n]})"
done
first=${SIZES%% *}; last=${SIZES##* }
# shellcheck disable=SC2086
printf 'at %s shards / at %s: CPU per step %.2fx (beyond the idle CPU %.2fx), per results message %.2fx; scheduling latency (mean) %.2fx (goal: flat, ~1x)\n' "$last" "$first" \
  "$(echo "$(bench_median ${cpu[$last]}) / $(bench_median ${cpu[$first]})" | bc -l)" \
  "$(echo "$(bench_median ${busy[$last]}) / $(bench_median ${busy[$first]})" | bc -l)" \
  "$(echo "$(bench_median ${cpu_msg[$last]}) / $(bench_median ${cpu_msg[$first]})" | bc -l)" \
  "$(echo "$(bench_median ${lat_mean[$last]}) / $(bench_median ${lat_mean[$first]})" | bc -l)"
