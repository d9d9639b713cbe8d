#!/usr/bin/env bash
# Memory with a full cache: keygate (release build, SQLite store) with 1,000,000 keys across
# 100,000 teams, every key used once through the proxy (so 1,000,000 cached keys and 100,000
# live limiter buckets), then a client spraying random well-formed keys. Prints RSS, the cache
# and bucket gauges after each phase.
#   bash benches/memory.sh        env: KEYS (1000000), TEAMS (100000), SPRAY seconds (30)
set -euo pipefail
cd "$(dirname "$0")/.."
KEYS=${KEYS:-1000000}; TEAMS=${TEAMS:-100000}; SPRAY=${SPRAY:-30}
PEERS=${PEERS:-../shared/bench/peers}
for tool in nginx wrk sqlite3; do
  command -v "$tool" >/dev/null || { apt-get install -y -qq nginx wrk sqlite3 >/dev/null; break; }
done
cargo build --release --quiet
D=$(mktemp -d); mkdir -p "$D/state" /tmp/kg-peers
cat > "$D/keygate.toml" <<EOF
[proxy]
listen = "127.0.0.1:18085"
workers = 1
[admin]
listen = "127.0.0.1:19092"
[upstream]
url = "http://127.0.0.1:18080"
[heartbeat]
required = false
[cache]
capacity = $((KEYS + KEYS / 10))
[limits]
failed_auth_per_minute = 0   # the worst case for the spray: every random key is looked up
[state]
dir = "$D/state"
[log]
level = "warn"
[plans.bench]
limits = [{ requests = 100000000, per = "1m" }]
[[routes]]
name = "api"
path = "/*"
EOF
kg=""; backend=""
cleanup() { [ -n "$kg" ] && kill "$kg" 2>/dev/null; [ -n "$backend" ] && kill "$backend" 2>/dev/null; rm -rf "$D"; }
trap cleanup EXIT
metric() { curl -s http://127.0.0.1:19092/metrics | awk -v m="$1" '$1==m {print $2}'; }
rss() { awk '/VmRSS/ {printf "%.1f MiB", $2/1024}' "/proc/$kg/status"; }
start() {
  ./target/release/keygate run --config "$D/keygate.toml" 2>>"$D/keygate.log" & kg=$!
  for _ in $(seq 100); do curl -sf http://127.0.0.1:19092/readyz >/dev/null && return; sleep 0.1; done
  echo "keygate did not start"; cat "$D/keygate.log"; exit 1
}
report() {
  echo "$1: rss=$(rss) cached_keys=$(metric keygate_key_cache_entries) buckets=$(metric keygate_limiter_buckets) store_lookups=$(metric keygate_store_lookups_total)"
}

# The store: keygate makes the schema, then the keys are written straight into it.
start; kill "$kg"; wait "$kg" || true; kg=""
python3 - "$D/state/keygate.db" "$KEYS" "$TEAMS" <<'EOF'
import hashlib, sqlite3, sys
db, keys, teams = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = sqlite3.connect(db)
c.executemany("INSERT INTO teams (id, plan, created_at) VALUES (?, 'bench', 0)",
              ((f"t{t}",) for t in range(teams)))
c.executemany("INSERT INTO keys (key_id, digest, team_id, created_at) VALUES (?, ?, ?, 0)",
              ((f"k{i}", hashlib.sha256(b"sk_mem_%022d" % i).digest(), f"t{i % teams}")
               for i in range(keys)))
c.commit()
EOF
echo "store: $KEYS keys, $TEAMS teams ($(du -h "$D/state/keygate.db" | cut -f1))"

sed "s/^worker_processes .*/worker_processes 1;/" "$PEERS/nginx-backend.conf" > "$D/backend.conf"
nginx -c "$D/backend.conf" -g "daemon off;" & backend=$!
start
report "start"

# Every key once: thread t of 2 takes keys start+t, start+t+2, …; each wrk run starts where the
# last one stopped.
cat > "$D/each.lua" <<EOF
local n = 0
local threads = 0
function setup(thread) thread:set("id", threads); threads = threads + 1 end
function init(args) n = tonumber(args[1]) + tonumber(wrk.thread:get("id")) end
function request()
  local i = n % $KEYS
  n = n + 2
  return wrk.format("GET", "/api/x", { ["x-api-key"] = string.format("sk_mem_%022d", i) })
end
EOF
start_at=0
for _ in $(seq 12); do
  out=$(wrk -t2 -c64 -d20s -s "$D/each.lua" http://127.0.0.1:18085/ -- "$start_at")
  echo "$out" | awk '/Requests\/sec/ {print "  fill: " $0}'
  start_at=$((start_at + $(echo "$out" | awk '/requests in/ {print $1}')))
  [ "$(metric keygate_key_cache_entries)" -ge "$KEYS" ] && break
done
report "all keys used"

cat > "$D/spray.lua" <<'EOF'
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
function request()
  return wrk.format("GET", "/api/x",
    { ["x-api-key"] = string.format("sk_mem_x%021d", math.random(0, 2^52)) })
end
EOF
wrk -t2 -c64 -d"${SPRAY}s" -s "$D/spray.lua" http://127.0.0.1:18085/ | awk '/Requests\/sec/ {print "  spray: " $0}'
report "after ${SPRAY}s of random keys"
echo "negative cache hits=$(curl -s http://127.0.0.1:19092/metrics | awk '$1=="keygate_key_cache_requests_total{result=\"negative_hit\"}" {print $2}')"
