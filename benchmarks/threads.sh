#!/usr/bin/env bash
# CPU per request of each thread of a running server under wrk, from /proc.
#
#   benchmarks/threads.sh PID URL [CONNECTIONS] [SECONDS]
#
# PID is the server (a sidecar, `tools.py bare`, `tools.py minimal`), URL its
# /v1/actions. Prints wrk's rate and p99, then, per thread with CPU in the window,
# microseconds of CPU (user + system) per request, and the whole machine's.
set -euo pipefail
pid=$1 url=$2 conns=${3:-64} secs=${4:-6}
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
py=${PYTHON:-$here/../.venv/bin/python}
"$py" - "$here" > "$tmp/post.lua" <<'PY'
import sys
sys.path.insert(0, sys.argv[1])
from tools import BODY  # noqa: E402
print('wrk.method = "POST"')
print(f"wrk.body = [[{BODY.decode()}]]")
print('wrk.headers["Content-Type"] = "application/json"')
PY
snap() {
  for t in /proc/"$pid"/task/*; do
    echo "$(basename "$t") $(tr ' ' _ < "$t/comm") $(awk '{print $14 + $15}' "$t/stat")"
  done | sort
}
machine() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
wrk -t1 -c"$conns" -d1s -s "$tmp/post.lua" "$url" > /dev/null  # warm-up
snap > "$tmp/before"; m0=$(machine)
out=$(wrk -t1 -c"$conns" -d"${secs}s" --latency -s "$tmp/post.lua" "$url")
snap > "$tmp/after"; m1=$(machine)
n=$(awk '/requests in/{print $1}' <<< "$out")
grep -E "Requests/sec|99%" <<< "$out"
tick_us=$((1000000 / $(getconf CLK_TCK)))
join "$tmp/before" "$tmp/after" | awk -v n="$n" -v t="$tick_us" -v pid="$pid" \
  '{d = $5 - $3; main = ($1 == pid) ? " (main: the event loop)" : "";
    if (d > 0) printf "  thread %s %s%s: %.1f us/request\n", $1, $2, main, d * t / n}'
echo "  machine: $(( (m1 - m0) * tick_us / n )) us/request"
