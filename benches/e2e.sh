#!/usr/bin/env bash
# End-to-end comparison on this machine, in one run: the upstream directly, nginx and HAProxy
# doing the gateway's job (../shared/bench/peers/), and keygate with config/bench.toml, in
# alternating rounds under the same wrk load. Prints requests/s, p99 and the ratios.
#   bash benches/e2e.sh            env: ROUNDS (2), DUR seconds (8), CONN (64), WORKERS (1)
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=${PEERS:-../shared/bench/peers}
for tool in nginx haproxy wrk; do
  command -v "$tool" >/dev/null || { echo "installing nginx haproxy wrk"; apt-get install -y -qq nginx haproxy wrk >/dev/null; break; }
done
cargo build --release --quiet
WORKERS=${WORKERS:-1}
config=$(mktemp --suffix .toml)
sed "s/^workers = .*/workers = $WORKERS/" config/bench.toml > "$config"
./target/release/keygate run --config "$config" > /tmp/keygate-e2e.log 2>&1 &
kg=$!
trap 'kill $kg 2>/dev/null; rm -f "$config"' EXIT
for _ in $(seq 50); do curl -sf http://127.0.0.1:19090/readyz >/dev/null && break; sleep 0.1; done
WORKERS=$WORKERS bash "$PEERS/run.sh" http://127.0.0.1:18083/api/x
