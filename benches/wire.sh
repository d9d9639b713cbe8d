#!/usr/bin/env bash
# A gateway's latency as seen on the wire, apart from the load generator's: tcpdump on loopback
# while wrk runs, then, per client connection, the time from a request's segment to its answer's
# ("server") and from an answer to the next request ("client": wrk's own turnaround).
#
# wrk's percentiles include both, and wrk corrects them for coordinated omission (`stats_correct`
# adds samples for the requests a stalled connection would have sent), so a few long stalls weigh
# on its p99 many times over. This tells a slow gateway from a starved client or a stalled
# upstream (BENCHMARKS.md, "Session of 2026-12-05 (third)").
#
#   bash benches/wire.sh URL        env: DUR seconds (4), CONN (64), LUA (a wrk script; default
#                                   benches/wrk/bench-keys.lua), STALL ms (5)
# URL: an IPv4 loopback address with its port, e.g. http://127.0.0.1:18083/api/x.
# Start the system under test first (for keygate: `setsid target/release/keygate run --config
# config/bench.toml &`, with the upstream of ../shared/bench/peers/nginx-backend.conf).
set -euo pipefail
URL=${1:?usage: bash benches/wire.sh URL}
DUR=${DUR:-4}; CONN=${CONN:-64}; STALL=${STALL:-5}
PORT=$(echo "$URL" | sed -E 's|^[a-z]+://[^/:]+:([0-9]+).*|\1|')
[[ "$PORT" =~ ^[0-9]+$ ]] || { echo "wire.sh: the URL needs an explicit port: $URL" >&2; exit 2; }
for tool in tcpdump wrk; do
  command -v "$tool" >/dev/null || apt-get install -y -qq tcpdump wrk >/dev/null
done
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
LUA=${LUA:-$(dirname "$0")/wrk/bench-keys.lua}
cat "$LUA" - > "$W/run.lua" <<'EOF'
function done(summary, latency, requests)
  io.write(string.format("wrk: requests/s=%.0f p50=%.0f p99=%.0f p99.9=%.0f us\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50),
    latency:percentile(99), latency:percentile(99.9)))
end
EOF

# Headers only; the capture spans the whole run, so every request has its answer.
tcpdump -i lo -nn -B 524288 -s 96 -w "$W/cap.pcap" "tcp port $PORT" 2>"$W/tcpdump.err" &
TD=$!
sleep 0.5
wrk -t1 -c"$CONN" -d"${DUR}s" -s "$W/run.lua" "$URL" | grep '^wrk:'
sleep 0.2
kill -INT $TD; wait $TD 2>/dev/null || true
{ grep -E 'captured|dropped by kernel' "$W/tcpdump.err" || true; } | tr '\n' ' '; echo

# Segments that carry data: to PORT is a request, from PORT an answer (wrk keeps one request in
# flight per connection).
tcpdump -r "$W/cap.pcap" -tt -nn 2>/dev/null | awk -v port="$PORT" -v dir="$W" '
  { n = $NF + 0; if ($(NF-1) != "length" || n == 0) next
    split($3, s, "."); split($5, d, "."); sp = s[5]; dp = d[5]; sub(":", "", dp)
    if (dp == port) { if (sp in ans) print ($1 - ans[sp]) * 1e6 > (dir "/client"); delete ans[sp]; req[sp] = $1 }
    else if (sp == port && (dp in req)) {
      t = ($1 - req[dp]) * 1e6; print t > (dir "/server"); print req[dp], t > (dir "/stamps")
      delete req[dp]; ans[dp] = $1 } }'
pct() { sort -g "$1" | awk -v name="$2" '{ v[NR] = $1 } END {
  if (NR == 0) { print name ": no samples"; exit }
  printf "%s: n=%d p50=%.0f p99=%.0f p99.9=%.0f max=%.0f us\n", name, NR, v[int(NR * 0.5) + 1],
    v[int(NR * 0.99) + 1], v[int(NR * 0.999) + 1], v[NR] }'; }
pct "$W/server" "wire, request to answer"
pct "$W/client" "wire, answer to next request"
# Stalls: answers slower than STALL ms, grouped when less than 10 ms apart (the last five shown).
sort -g "$W/stamps" | awk -v lim="$STALL" '
  NR == 1 { first = $1 }
  $2 > lim * 1000 {
    if (n > 0 && $1 - last > 0.01) flush()
    if (n == 0) at = $1
    n++; total++; if ($2 > worst) worst = $2; if ($2 > gworst) gworst = $2; last = $1 }
  function flush() { printf "  stall at %.3f s: %d answers, longest %.1f ms\n", at - first, n, worst / 1000
    groups++; n = 0; worst = 0 }
  END { if (n > 0) flush()
    printf "answers over %s ms: %d, in %d stalls, longest %.1f ms\n", lim, total, groups, gworst / 1000 }' |
  tail -n 6
