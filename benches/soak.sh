#!/usr/bin/env bash
# Soak: mixed traffic against keygate for a while, printing its RSS and open file descriptors
# every 30 s; both must level off.
#   bash benches/soak.sh            env: MINUTES (10), CONN (64)
# Traffic, all at once, on loopback against config/bench.toml plus a team on a tiny plan:
# - valid keys across the 1,000 bench teams (keep-alive),
# - random well-formed keys, a new one per request (the key-spraying client),
# - a team over its limit (429s),
# - connection churn: every request on a new connection (Connection: close).
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${MINUTES:-10}; CONN=${CONN:-64}; DUR=$((MINUTES * 60))
for tool in nginx wrk; do
  command -v "$tool" >/dev/null || apt-get install -y -qq nginx wrk >/dev/null
done
cargo build --release --quiet
D=$(mktemp -d)
sed "s/^worker_processes .*/worker_processes 1;/; s|/tmp/kg-peers|$D|g" ../shared/bench/peers/nginx-backend.conf > "$D/backend.conf"
nginx -c "$D/backend.conf"
cp config/bench.toml "$D/soak.toml"
cat >> "$D/soak.toml" <<'TOML'

[plans.tiny]
limits = [{ requests = 10, per = "1m" }]

[[teams]]
id = "tiny"
plan = "tiny"
keys = [{ id = "tiny-key", sha256 = "a3b0f0b9a2d0e4f6bbd7c0f7d5a3a1c1d6e0f7a0b0c9d8e7f6a5b4c3d2e1f0a9" }]
TOML
# The tiny team's key is whatever hashes to that digest: unknown here, so use a real one.
TINY_KEY=sk_live_soaktiny_0000000000000000000001
TINY_DIGEST=$(printf '%s' "$TINY_KEY" | sha256sum | cut -d' ' -f1)
sed -i "s/a3b0f0b9a2d0e4f6bbd7c0f7d5a3a1c1d6e0f7a0b0c9d8e7f6a5b4c3d2e1f0a9/$TINY_DIGEST/" "$D/soak.toml"
./target/release/keygate run --config "$D/soak.toml" > "$D/keygate.log" 2>&1 &
kg=$!
cleanup() { kill $kg 2>/dev/null || true; kill "$(cat "$D/backend.pid")" 2>/dev/null || true; pkill -P $$ wrk 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 50); do curl -sf http://127.0.0.1:19090/readyz >/dev/null && break; sleep 0.1; done
cat > "$D/valid.lua" <<'LUA'
request = function()
  local k = string.format("sk_live_benchkey_%022d", math.random(0, 999))
  return wrk.format("GET", "/api/x", { ["x-api-key"] = k })
end
LUA
cat > "$D/spray.lua" <<'LUA'
request = function()
  local k = string.format("sk_live_spray_%016x%016x", math.random(0, 2^31), math.random(0, 2^31))
  return wrk.format("GET", "/api/x", { ["x-api-key"] = k })
end
LUA
U=http://127.0.0.1:18083
wrk -t1 -c"$CONN" -d"${DUR}s" -s "$D/valid.lua" $U > "$D/valid.out" 2>&1 &
wrk -t1 -c8 -d"${DUR}s" -s "$D/spray.lua" $U > "$D/spray.out" 2>&1 &
wrk -t1 -c4 -d"${DUR}s" -H "x-api-key: $TINY_KEY" $U/api/x > "$D/limited.out" 2>&1 &
wrk -t1 -c8 -d"${DUR}s" -H "Connection: close" -H "x-api-key: sk_live_benchkey_0000000000000000000007" $U/api/x > "$D/churn.out" 2>&1 &
echo "t_s rss_kib fds"
for t in $(seq 0 30 "$DUR"); do
  [ "$t" -gt 0 ] && sleep 30
  echo "$t $(awk '/VmRSS/ {print $2}' /proc/$kg/status) $(ls /proc/$kg/fd | wc -l)"
done
wait $(jobs -p | grep -v "^$kg$") 2>/dev/null || true
for f in valid spray limited churn; do echo "$f: $(grep -E 'Requests/sec' "$D/$f.out") $(grep -E 'Non-2xx' "$D/$f.out")"; done
curl -s http://127.0.0.1:19090/metrics | grep -E '^keygate_(requests_total|store_lookups_total|key_cache_entries|limiter_buckets|upstream_connections_total|open_connections)' | grep -v ' 0$'
