# Shared by the benchmark scripts (sourced, not run): the release build, one throwaway
# PostgreSQL server in a scratch directory (stopped and removed on exit), the reference
# fleet, a coordinator with one agent per shard, and the small helpers they all time with.
#
# A script sets ROOT (the repo) before sourcing; then calls, in this order:
#   bench_init NAME                 scratch dir $work, the PostgreSQL binaries ($bindir), the trap
#   bench_build                     cargo build --release; sets FLOTILLA
#   bench_start_pg [-c SETTING]...  initdb + start on a random port; exports PGURL and PATH
#   bench_coordinator PORT LOG STORE   starts one; sets COORD_PID and addr
#   bench_agents LABEL              one agent per shard ($SHARDS, $PAR lanes); sets AGENT_PIDS
#   bench_wait_connected [TRIES]    until every agent is attached
#   bench_stop_flotilla             kills what bench_coordinator/bench_agents started
# and, for scripts that run their own processes: bench_etcd_start CLIENT_PORT PEER_PORT,
# bench_wait_agents ADDR N, bench_cpu_seconds PID, bench_cpu_reading PID,
# bench_cpu_between BEFORE AFTER and bench_slow_events LE BEFORE AFTER.
# Environment: SHARED (default ../shared beside the repo), FLOTILLA_PG_BINDIR, FLOTILLA_BIN,
# FLOTILLA_BENCH_KEEP=1 keeps the logs and the server's data dir.

SHARED=${SHARED:-$ROOT/../shared}
BENCH=$SHARED/bench
pids=()
COORD_PID=
AGENT_PIDS=()

bench_init() {
  [ -x "$BENCH/make-fleet.sh" ] || { echo "error: $BENCH/make-fleet.sh not found (set SHARED)" >&2; exit 2; }
  bindir=${FLOTILLA_PG_BINDIR:-}
  [ -n "$bindir" ] || bindir=$(pg_config --bindir 2>/dev/null || true)
  [ -x "$bindir/initdb" ] || bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5,5 -rn | head -1)
  [ -x "$bindir/initdb" ] || { echo "error: initdb not found; run scripts/test.sh once to install PostgreSQL" >&2; exit 2; }
  work=$(mktemp -d "/tmp/$1.XXXXXX")
  chmod 755 "$work"
  as_pg=()
  if [ "$(id -u)" -eq 0 ]; then
    chown postgres "$work"
    as_pg=(runuser -u postgres --)
  fi
  trap bench_cleanup EXIT
}

bench_cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  "${as_pg[@]}" "$bindir/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true
  if [ -n "${FLOTILLA_BENCH_KEEP:-}" ]; then echo "logs kept in $work"; else rm -rf "$work"; fi
}

# FLOTILLA_BIN=path runs that binary instead (an A/B against an older build); no build then.
bench_build() {
  if [ -n "${FLOTILLA_BIN:-}" ]; then
    FLOTILLA=$FLOTILLA_BIN
    echo "==== using $FLOTILLA"
    return
  fi
  echo "==== building flotilla (release)"
  cargo build --release --quiet --bin flotilla
  FLOTILLA=$ROOT/target/release/flotilla
}

# Extra server settings as `-c name=value` pairs; max_connections=200 always.
bench_start_pg() {
  port=$(( 20000 + RANDOM % 10000 ))
  "${as_pg[@]}" "$bindir/initdb" -D "$work/data" -U postgres --auth=trust -E UTF8 --locale=C >/dev/null
  "${as_pg[@]}" "$bindir/pg_ctl" -D "$work/data" -l "$work/pg.log" -w \
    -o "-p $port -k $work -c listen_addresses=127.0.0.1 -c max_connections=200 $*" start >/dev/null
  export PGURL="postgres://postgres@127.0.0.1:$port"
  export PATH="$bindir:$PATH"
}

bench_coordinator() {
  local cport=$1 log=$2 store=$3 metrics=${4:-}
  "$FLOTILLA" coordinator --listen "127.0.0.1:$cport" --store "$store" ${metrics:+--metrics "$metrics"} >"$log" 2>&1 &
  COORD_PID=$!
  pids+=("$COORD_PID")
  addr="http://127.0.0.1:$cport"
  for ((i=0; i<100; i++)); do grep -qs "coordinator listening" "$log" && break; sleep 0.1; done
}

bench_agents() {
  local label=$1
  AGENT_PIDS=()
  for ((s=0; s<SHARDS; s++)); do
    FLOTILLA_LOG=warn "$FLOTILLA" --coordinator "$addr" agent --shard "shard_$s" --dsn "$PGURL/shard_$s" \
      --tenant-pattern 'tenant_%' --max-connections "$PAR" >"$work/agent-$label-$s.log" 2>&1 &
    AGENT_PIDS+=($!)
    pids+=($!)
  done
}

# Recreates the first $1 shard databases from their templates, then checkpoints. CREATE
# DATABASE logs the whole copy of each database, and a 10,000-tenant rollout writes about
# 400 MB of WAL more: without the checkpoint, whether one starts in the middle of a run (and
# its full-page writes with it) depended on what ran before, not on the contender.
bench_reset_fleet() {
  "$BENCH/make-fleet.sh" --reset "$1" >/dev/null 2>&1
  psql "$PGURL/postgres" -XAtqc "CHECKPOINT" >/dev/null
}

# A histogram's count, sum and bucket counts from a /metrics text on stdin, one line:
# "count sum le1:c1 le2:c2 ...".
histogram_of() {
  awk -v m="$1" '
    index($0, m "_count") == 1 {c = $2}
    index($0, m "_sum") == 1 {s = $2}
    index($0, m "_bucket{le=\"") == 1 {split($0, a, "\""); b = b " " a[2] ":" $2}
    END {print c + 0, s + 0 b}'
}

bench_wait_connected() {
  local tries=${1:-200} n
  for ((i=0; i<tries; i++)); do
    n=$("$FLOTILLA" --coordinator "$addr" fleet list --output json 2>/dev/null | grep -o '"connected":true' | wc -l || true)
    [ "$n" -eq "$SHARDS" ] && return 0; sleep 0.1
  done
  echo "error: not every agent attached ($n of $SHARDS)" >&2
  return 1
}

# Waits until the agents' start-up inventory is in: every one of $1 targets has its schema
# fingerprint at the coordinator (`fleet drift`), which each agent reads once after it
# attaches (the whole journal and every target's catalog). A fleet's agents run for weeks;
# a benchmark that starts them for each contender would otherwise time their start-up beside
# the rollout. Sets R_INVENTORY (seconds waited).
bench_wait_inventory() {
  local want=$1 t0 i
  t0=$(now)
  for ((i=0; i<1200; i++)); do
    if "$FLOTILLA" --coordinator "$addr" fleet drift --output json 2>/dev/null | python3 -c '
import json, sys
d = json.load(sys.stdin)
sys.exit(0 if d["targets"] >= int(sys.argv[1]) and not d["unfingerprinted"] and not d["unreported_shards"] else 1)' "$want" 2>/dev/null; then
      R_INVENTORY=$(printf '%.2f' "$(echo "$(now) - $t0" | bc)")
      return 0
    fi
    sleep 0.1
  done
  echo "error: the agents' start-up inventory of $want targets did not come in within two minutes" >&2
  return 1
}

bench_stop_flotilla() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
  COORD_PID=
  AGENT_PIDS=()
}

# Peak resident set of a live process in MB (VmHWM, 10^6 bytes), or "?" when it is gone.
peak_rss_mb() {
  if [ -r "/proc/$1/status" ]; then
    awk '/^VmHWM:/ {printf "%.1f\n", $2 * 1024 / 1e6; found=1} END {if (!found) print "?"}' "/proc/$1/status"
  else
    echo "?"
  fi
}

# The coordinator engine's events over LE seconds (a bucket bound of
# flotilla_engine_event_seconds, "0.005", "0.05") between two /metrics readings BEFORE and
# AFTER (BEFORE empty: since the start), by kind: "kind count, ..." or "none". Whatever waits
# on the engine (results to hand out, a plan status) waits behind the event it is on.
bench_slow_events() {
  { echo "$2" | sed 's/^/before /'; echo "$3" | sed 's/^/after /'; } | awk -v le="le=\"$1\"" '
    $2 ~ /^flotilla_engine_event_seconds_(bucket|count)\{/ {
      if ($2 ~ /_bucket\{/ && index($2, le) == 0) next
      match($2, /event="[^"]*"/); k = substr($2, RSTART + 7, RLENGTH - 8)
      v = ($1 == "after" ? 1 : -1) * $3
      if ($2 ~ /_count\{/) n[k] += v; else fast[k] += v
    }
    END { for (k in n) if (n[k] - fast[k] > 0) { out = out sep k " " n[k] - fast[k]; sep = ", " }
          print (out == "" ? "none" : out) }'
}

# A reading of process $1's CPU for bench_cpu_between: "TICKS_SECONDS TID:NS TID:NS ...".
# The ticks (/proc/PID/stat) count threads that have ended too, but in steps of 10 ms: a
# window of 50 ms of CPU (960 steps at 0.05 ms) read that way is off by up to 40%. Each live
# thread's run time (/proc/PID/task/TID/schedstat, first field) is in nanoseconds.
bench_cpu_reading() {
  local t ticks v
  ticks=$(bench_cpu_seconds "$1")
  printf '%s' "$ticks"
  for t in /proc/"$1"/task/*/schedstat; do
    # a thread that ended just now is left out (and so found missing by bench_cpu_between)
    v=$(cut -d' ' -f1 "$t" 2>/dev/null) || continue
    t=${t%/schedstat}
    printf ' %s:%s' "${t##*/}" "$v"
  done
  echo
}

# CPU seconds between two bench_cpu_reading readings: the threads' nanoseconds when every
# thread of the first is still there in the second (one that ended took its time with it),
# else the ticks; the ticks too when the kernel shows no thread's run time, or when they
# count 20 ms more than the threads (one started and ended in between).
bench_cpu_between() {
  awk -v before="$1" -v after="$2" 'BEGIN {
    nb = split(before, B, " "); na = split(after, A, " ")
    ticks = A[1] - B[1]
    if (nb < 2 || na < 2) { why = "no thread run times in /proc/PID/task"; ns = -1 }
    for (i = 2; i <= na; i++) { split(A[i], x, ":"); now[x[1]] = x[2] }
    for (i = 2; i <= nb && ns >= 0; i++) {
      split(B[i], x, ":")
      if (!(x[1] in now)) { why = "a thread ended within the window"; ns = -1; break }
      ns += now[x[1]] - x[2]; delete now[x[1]]
    }
    if (ns >= 0) {
      for (t in now) ns += now[t]
      if (ticks > ns / 1e9 + 0.02) { why = "a thread started and ended within the window"; ns = -1 }
    }
    if (ns < 0) {
      print "note: " why ": the CPU read in 10 ms ticks" > "/dev/stderr"
      printf "%.6f\n", ticks
    } else {
      printf "%.6f\n", ns / 1e9
    }
  }'
}

# Waits until the server holds only the agents' lock sessions, one per shard ($1 shards): the
# pooled sessions of the agents' start-up inventory close once idle for half a second. An agent
# runs for weeks, so a plan submitted to it meets only its lock session, not those; sessions left
# open would each take their share of every catalog invalidation the rollout's DDL sends. At
# most 10 s; sets R_SESSIONS_CLOSED (seconds waited).
bench_wait_agent_sessions() {
  local shards=$1 t0 n i
  t0=$(now)
  for ((i=0; i<100; i++)); do
    n=$(psql "$PGURL/postgres" -XAtc "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'flotilla-agent'" 2>/dev/null || echo -1)
    [ "$n" = "$shards" ] && break
    sleep 0.1
  done
  [ "$n" = "$shards" ] || echo "warning: $n agent sessions open for $shards shards before the submit" >&2
  R_SESSIONS_CLOSED=$(printf '%.2f' "$(echo "$(now) - $t0" | bc)")
}

# Until no client session but this check's own is left on the benchmark's server (a
# contender's backends gone, so pg_cpu_seconds counts them among the reaped); at most 10 s.
pg_wait_sessions_closed() {
  local n
  for ((i=0; i<100; i++)); do
    n=$(psql "$PGURL/postgres" -XAtc "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()" 2>/dev/null || echo 1)
    [ "$n" = 0 ] && return 0
    sleep 0.1
  done
  echo "warning: $n client sessions still open on the benchmark server" >&2
}

# CPU seconds the benchmark's PostgreSQL server has used so far: the postmaster, the
# backends it has reaped (its cutime/cstime) and those alive now. Taken after a contender's
# sessions closed, the difference is what the server spent on that contender.
pg_cpu_seconds() {
  pg_cpu_split | awk '{print $1 + $2}'
}

# The same, as "user system" seconds: the kernel's part (file creation and removal, I/O) is
# where runs of the same work differ most on this file system.
pg_cpu_split() {
  local pm
  pm=$("${as_pg[@]}" head -1 "$work/data/postmaster.pid" 2>/dev/null) || { echo "? ?"; return; }
  { sed 's/^.*) //' "/proc/$pm/stat" | awk '{print $12 + $14, $13 + $15}'
    for c in $(pgrep -P "$pm" || true); do
      { sed 's/^.*) //' "/proc/$c/stat" 2>/dev/null || true; } | awk '{print $12, $13}'
    done
  } | awk -v hz="$(getconf CLK_TCK)" '{u += $1; s += $2} END {printf "%.2f %.2f\n", u / hz, s / hz}'
}

# The machine's busy and total CPU ticks so far (all cores), as "busy total".
machine_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8, $2 + $3 + $4 + $5 + $6 + $7 + $8}' /proc/stat; }

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
now() { date +%s.%N; }

# Starts a one-member etcd on $1 (client) and $2 (peer); waits until it answers.
bench_etcd_start() {
  etcd --name b --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$1" \
    --advertise-client-urls "http://127.0.0.1:$1" --listen-peer-urls "http://127.0.0.1:$2" \
    --initial-advertise-peer-urls "http://127.0.0.1:$2" --initial-cluster "b=http://127.0.0.1:$2" >"$work/etcd.log" 2>&1 &
  pids+=($!)
  for ((i=0; i<100; i++)); do curl -fs "http://127.0.0.1:$1/health" >/dev/null 2>&1 && return; sleep 0.1; done
  echo "error: etcd did not answer on port $1" >&2; exit 1
}

# Forgets which control store the etcd group on client port $1 shares (`/flotilla/store`):
# each run's coordinator starts on a fresh store beside the same etcd, which the group's
# store check (rightly) refuses at start, exit 2. Through etcd's JSON gateway (no etcdctl).
bench_etcd_forget_store() {
  curl -fs -X POST "http://127.0.0.1:$1/v3/kv/deleterange" \
    -d "{\"key\":\"$(printf '%s' /flotilla/store | base64)\"}" >/dev/null \
    || { echo "error: cannot delete /flotilla/store in etcd on port $1" >&2; exit 1; }
}

# Waits until $2 agents are attached to the coordinator at $1.
bench_wait_agents() {
  local n=0
  for ((i=0; i<600; i++)); do
    n=$("$FLOTILLA" --coordinator "$1" fleet list --output json 2>/dev/null | grep -o '"connected":true' | wc -l || true)
    [ "$n" -eq "$2" ] && return; sleep 0.1
  done
  echo "error: $n of $2 agents attached to $1" >&2; exit 1
}

# User+sys CPU seconds of process $1 so far (fields 14 and 15 of /proc/PID/stat, in ticks;
# the command name in field 2 holds no space for flotilla).
bench_cpu_seconds() {
  if [ -r "/proc/$1/stat" ]; then
    # the fields after the command name (which ends in ')'): utime is the 12th, stime the 13th
    sed 's/^.*) //' "/proc/$1/stat" | awk -v hz="$(getconf CLK_TCK)" '{printf "%.3f\n", ($12 + $13) / hz}'
  else
    echo "?"
  fi
}
