#!/usr/bin/env bash
# End-to-end comparison on this machine, in one run: the upstream directly, nginx and HAProxy
# doing the gateway's job (configs from ../shared/bench/peers/), keygate with config/bench.toml,
# and keygate with authentication and limits off (a public route; metrics stay on), in
# alternating rounds under the same wrk load over the 1,000 bench keys. keygate runs as configured
# (upstream.pipeline = 32) and, as "serial", with pipelining off (the valid scenario only).
#
# Scenarios, each printing requests/s, p50/p99/p99.9 and non-2xx per system, then ratios:
#   valid    every request carries one of the 1,000 keys (round robin)
#   invalid  every request carries the same unknown key, then a new random one each time
#   limited  plans small enough that about half the requests get 429 (same limit for all three),
#            then one team's key only, its plan spent before the run: every answer a 429 and
#            nothing forwarded (the over-limit flood)
#   cpu      a fixed offered rate; CPU microseconds per request of keygate, nginx and HAProxy
#
#   bash benches/e2e.sh        env: WORKERS (1), ROUNDS (2), DUR seconds (8), CONN (64),
#                                   SCENARIOS ("valid invalid limited cpu")
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=$(cd "${PEERS:-../shared/bench/peers}" && pwd)
WORKERS=${WORKERS:-1}; ROUNDS=${ROUNDS:-2}; DUR=${DUR:-8}; CONN=${CONN:-64}
SCENARIOS=${SCENARIOS:-"valid invalid limited cpu"}
for tool in nginx haproxy wrk; do
  command -v "$tool" >/dev/null || { echo "installing nginx haproxy wrk"; apt-get install -y -qq nginx haproxy wrk >/dev/null; break; }
done
cargo build --release --quiet
D=/tmp/kg-peers; mkdir -p $D; : > $D/results
W=$(mktemp -d)

# --- the systems -------------------------------------------------------------------------------
: > $D/nginx-keys.map; : > $D/haproxy-keys.map
for i in $(seq 0 999); do
  k=$(printf 'sk_live_benchkey_%022d' "$i")
  echo "\"$k\" team$i;" >> $D/nginx-keys.map; echo "$k team$i" >> $D/haproxy-keys.map
done
# peer_configs RATE: the per-team limit per second, "none" for the shipped one that does not
# bite, or "spent" for one request an hour (nginx: a minute, its smallest unit).
peer_configs() {
  local ngx=() hap=()
  if [ "$1" = spent ]; then
    ngx=(-e "s/rate=[0-9]*r\/m/rate=1r\/m/" -e "s/burst=[0-9]*/burst=1/")
    hap=(-e "s/sc_http_req_rate(0) gt [0-9]*/sc_http_req_rate(0) gt 1/")
  elif [ "$1" != none ]; then
    ngx=(-e "s/rate=[0-9]*r\/m/rate=$1r\/s/" -e "s/burst=[0-9]*/burst=$1/")
    hap=(-e "s/http_req_rate(1h)/http_req_rate(1s)/" -e "s/sc_http_req_rate(0) gt [0-9]*/sc_http_req_rate(0) gt $1/")
  fi
  sed "s/^worker_processes .*/worker_processes $WORKERS;/" "$PEERS/nginx-backend.conf" > $D/nginx-backend.conf
  # nginx logs every request limit_req refuses, at `error` by default, so with the shipped
  # `error_log ... warn` each 429 was a line written to disk (5.9 GB over one session's runs).
  # keygate (log level warn) and HAProxy (no log) write nothing per refusal: logged at `info`,
  # below the log's level, nginx's refusals are not written either.
  sed -e "s/^worker_processes .*/worker_processes $WORKERS;/" "${ngx[@]}" \
      -e "s/^\( *\)limit_req_status 429;/&\n\1limit_req_log_level info;/" \
      "$PEERS/nginx-gateway.conf" > $D/nginx-gateway.conf
  sed -e "s/nbthread .*/nbthread $WORKERS/" "${hap[@]}" \
      "$PEERS/haproxy-gateway.cfg" > $D/haproxy-gateway.cfg
}
# keygate_config NAME PORT ADMIN_PORT RATE OPEN
keygate_config() {
  local lim=()
  case $4 in
    none) ;;
    spent) lim=(-e 's/^limits = .*/limits = [{ requests = 1, per = "1h", burst = 1 }]/') ;;
    *) lim=(-e "s/^limits = .*/limits = [{ requests = $4, per = \"1s\", burst = $4 }]/") ;;
  esac
  sed -e "s/^workers = .*/workers = $WORKERS/" -e "s/127.0.0.1:18083/127.0.0.1:$2/" \
      -e "s/127.0.0.1:19090/127.0.0.1:$3/" "${lim[@]}" \
      config/bench.toml > "$W/$1.toml"
  if [ "$5" = open ]; then
    sed -i 's|^path = "/\*"$|path = "/*"\npublic = true|' "$W/$1.toml"
  fi
  if [ "$5" = serial ]; then
    sed -i '/^pipeline = /d' "$W/$1.toml"
  fi
}
pids=()
stop_all() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; pids=()
  for p in $D/*.pid; do [ -f "$p" ] && { kill "$(cat "$p")" 2>/dev/null || true; }; rm -f "$p"; done
  sleep 0.5
}
trap 'stop_all; rm -rf "$W"' EXIT
# start_all RATE_PER_SEC
start_all() {
  stop_all
  peer_configs "$1"
  nginx -c $D/nginx-backend.conf && nginx -c $D/nginx-gateway.conf
  haproxy -D -p $D/haproxy.pid -f $D/haproxy-gateway.cfg
  keygate_config keygate 18083 19090 "$1" closed
  keygate_config open 18084 19091 "$1" open
  keygate_config serial 18085 19092 "$1" serial
  # Each keygate in a session of its own, as nginx and HAProxy are (they daemonize): with
  # autogroup scheduling (kernel.sched_autogroup_enabled, on by default) a session is a group
  # that gets an equal share of the CPUs. Started from this script, keygate shared wrk's group
  # and got half the share its peers got; at two workers that starved the upstream in turns
  # (stalls of 20-40 ms; BENCHMARKS.md, "Session of 2026-12-05 (third)"). setsid execs in
  # place here (a background job is not a group leader), so $! is keygate's pid.
  for c in keygate open serial; do
    setsid ./target/release/keygate run --config "$W/$c.toml" >> "$W/$c.log" 2>&1 & pids+=($!)
  done
  for port in 19090 19091 19092; do
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
  done
}
URL_direct=http://127.0.0.1:18080/api/x
URL_nginx=http://127.0.0.1:18081/api/x
URL_haproxy=http://127.0.0.1:18082/api/x
URL_keygate=http://127.0.0.1:18083/api/x
URL_open=http://127.0.0.1:18084/api/x
URL_serial=http://127.0.0.1:18085/api/x

# --- load ----------------------------------------------------------------------------------------
cat > "$W/report.lua" <<'EOF'
function done(summary, latency, requests)
  io.write(string.format("REPORT requests=%d p50=%.0f p99=%.0f p999=%.0f\n", summary.requests,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
EOF
cat "$W/report.lua" benches/wrk/bench-keys.lua > "$W/valid.lua"
cat "$W/report.lua" - > "$W/repeated.lua" <<'EOF'
wrk.headers["x-api-key"] = "sk_live_benchkey_9999999999999999999999"
EOF
# One team's key only: with its plan spent, every request is a 429.
cat "$W/report.lua" - > "$W/overlimit.lua" <<'EOF'
wrk.headers["x-api-key"] = "sk_live_benchkey_0000000000000000000000"
EOF
# 100,000 random keys made before the run and sent in turn. Formatting a request per request
# made wrk the bound (100 % of its core at ~175 k/s). With the failed-authentication budget on
# (the default) a key met again takes the same path through keygate as a new one.
cat "$W/report.lua" - > "$W/random.lua" <<'EOF'
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
local reqs, n = {}, 0
function init(args)
  for i = 1, 100000 do
    reqs[i] = wrk.format("GET", nil, { ["x-api-key"] = string.format("sk_live_benchkey_x%021d", math.random(0, 2^52)) })
  end
end
function request()
  n = n % #reqs + 1
  return reqs[n]
end
EOF
# A fixed offered rate: every connection waits DELAY ms between requests.
cat "$W/valid.lua" - > "$W/paced.lua" <<'EOF'
function delay() return 8 end
EOF

cpu_ticks() { # sum of utime+stime of processes (all their threads), in clock ticks
  local total=0
  for p in "$@"; do
    [ -r "/proc/$p/stat" ] && total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo $total
}
# pids_of NAME: the processes whose CPU a system's requests cost (for direct, the upstream's).
pids_of() {
  local m
  case $1 in
    direct) m=$(cat $D/backend.pid); echo "$m" $(pgrep -P "$m") ;;
    nginx) m=$(cat $D/nginx-gw.pid); echo "$m" $(pgrep -P "$m") ;;
    haproxy) cat $D/haproxy.pid ;;
    keygate) echo "${pids[0]}" ;;
    open) echo "${pids[1]}" ;;
    serial) echo "${pids[2]}" ;;
  esac
}
# bench SCENARIO NAME SCRIPT: wrk's figures, then what the run cost: the system's CPU per request
# (cpu_us), its CPU and wrk's as a share of one core (cpu_pct, wrk_pct). A system near 100 % per
# worker is the bound; wrk near 100 % means the load generator is, and requests/s understates the
# system. HZ-tick resolution: 10 ms over the run.
bench() {
  local url_var="URL_$2" out sys_pids before after TIMEFORMAT='WRKCPU %U %S'
  # shellcheck disable=SC2207
  sys_pids=($(pids_of "$2"))
  before=$(cpu_ticks "${sys_pids[@]}")
  out=$( { time wrk -t1 -c"$CONN" -d"${DUR}s" -s "$W/$3.lua" "${!url_var}" 2>&1; } 2>&1)
  after=$(cpu_ticks "${sys_pids[@]}")
  local rps non2xx rep cost
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  non2xx=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
  rep=$(echo "$out" | awk '/^REPORT/ {print $3, $4, $5}')
  cost=$(echo "$out" | awk -v t=$((after - before)) -v hz="$(getconf CLK_TCK)" -v d="$DUR" -v r="$rps" \
    '/^WRKCPU/ {printf "cpu_us=%.2f cpu_pct=%.0f wrk_pct=%.0f", t / hz * 1e6 / (r * d), t / hz / d * 100, ($2 + $3) / d * 100}')
  echo "$1 $2 rps=$rps ${rep} non2xx=${non2xx:-0} $cost" | tee -a $D/results
}
echo "machine: $(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo); kernel $(uname -r), autogroup=$(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null || echo none); workers=$WORKERS conn=$CONN dur=${DUR}s rounds=$ROUNDS"
start_all none
for s in $SCENARIOS; do
  case $s in
    valid)
      for _ in $(seq "$ROUNDS"); do
        for sys in direct nginx haproxy keygate open serial; do bench valid $sys valid; done
      done ;;
    invalid)
      for _ in $(seq "$ROUNDS"); do
        for sys in nginx haproxy keygate; do bench invalid-repeated $sys repeated; bench invalid-random $sys random; done
        bench valid keygate valid
      done ;;
    limited)
      # Half the throughput keygate just reached, over 1,000 teams, per second.
      rps=$(awk '$1=="valid" && $2=="keygate" {split($3,a,"="); s+=a[2]; n++} END {print int(s/n)}' $D/results)
      rate=$(( rps / 2000 > 0 ? rps / 2000 : 1 ))
      echo "limited: $rate requests per team per second (burst $rate)"
      start_all "$rate"
      for _ in $(seq "$ROUNDS"); do
        for sys in nginx haproxy keygate; do bench limited $sys valid; done
      done
      # The over-limit flood: the key's plan spent before wrk starts, so nothing is forwarded.
      start_all spent
      for sys in nginx haproxy keygate; do
        url_var="URL_$sys"
        for _ in 1 2 3; do
          curl -s -o /dev/null -H "x-api-key: sk_live_benchkey_0000000000000000000000" "${!url_var}"
        done
      done
      for _ in $(seq "$ROUNDS"); do
        for sys in nginx haproxy keygate; do bench over-limit $sys overlimit; done
      done
      start_all none ;;
    cpu)
      for sys in keygate haproxy nginx; do bench cpu $sys paced; done ;;
  esac
done

# --- summary: medians per scenario and system, and the ratios -------------------------------------
# Each figure is the median over the rounds, taken on its own (the p99 is the median of the rounds'
# p99s, not the p99 of the median-throughput round): one round's scheduling luck moves a tail.
echo
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
awk '$3 ~ /^rps=/ {print $1, $2}' $D/results | sort -u |
while read -r sc sys; do
  line="median $sc $sys"
  for f in rps p50 p99 p999 non2xx cpu_us cpu_pct wrk_pct; do
    line="$line $f=$(awk -v s="$sc" -v y="$sys" -v f="$f" '$1 == s && $2 == y {
      for (i = 3; i <= NF; i++) { split($i, a, "="); if (a[1] == f) print a[2] } }' $D/results | median)"
  done
  echo "$line"
done | tee $D/medians
awk '{k = $2" "$3; split($4,a,"="); m[k]=a[2]; split($6,b,"="); p[k]=b[2]; split($9,c,"="); u[k]=c[2]; split($11,w,"="); g[k]=w[2]} END {
  v = m["valid keygate"]
  if (m["valid direct"]) printf "valid: keygate/direct=%.2f keygate/nginx=%.2f keygate/haproxy=%.2f nginx/direct=%.2f haproxy/direct=%.2f keygate/keygate-open=%.2f\n", v/m["valid direct"], v/m["valid nginx"], v/m["valid haproxy"], m["valid nginx"]/m["valid direct"], m["valid haproxy"]/m["valid direct"], v/m["valid open"]
  if (p["valid keygate"] && p["valid nginx"] && p["valid haproxy"]) printf "valid p99 (us): keygate=%d nginx=%d haproxy=%d keygate/nginx=%.2f keygate/haproxy=%.2f (at most 1: no worse)\n", p["valid keygate"], p["valid nginx"], p["valid haproxy"], p["valid keygate"]/p["valid nginx"], p["valid keygate"]/p["valid haproxy"]
  if (m["valid serial"]) printf "pipelining off (serial): serial/nginx=%.2f serial/haproxy=%.2f serial/direct=%.2f keygate/serial=%.2f; p99 serial/nginx=%.2f serial/haproxy=%.2f\n", m["valid serial"]/m["valid nginx"], m["valid serial"]/m["valid haproxy"], m["valid serial"]/m["valid direct"], v/m["valid serial"], p["valid serial"]/p["valid nginx"], p["valid serial"]/p["valid haproxy"]
  if (m["invalid-repeated keygate"]) printf "invalid: keygate repeated/valid=%.2f random/valid=%.2f random/repeated=%.2f; nginx repeated/valid=%.2f; haproxy repeated/valid=%.2f\n", m["invalid-repeated keygate"]/v, m["invalid-random keygate"]/v, m["invalid-random keygate"]/m["invalid-repeated keygate"], m["invalid-repeated nginx"]/m["valid nginx"], m["invalid-repeated haproxy"]/m["valid haproxy"]
  # Capacity: CPU per forwarded request over CPU per refusal, each measured at saturation, so
  # the ratio holds whether the system or wrk was the bound (wrk_pct says which).
  if (u["invalid-repeated keygate"] && u["valid keygate"]) printf "CPU per request (us): keygate valid=%.2f repeated-invalid=%.2f random-invalid=%.2f; valid/refusal: repeated=%.2f random=%.2f; nginx valid/repeated=%.2f; haproxy valid/repeated=%.2f; wrk %%core in keygate valid=%d repeated=%d random=%d\n", u["valid keygate"], u["invalid-repeated keygate"], u["invalid-random keygate"], u["valid keygate"]/u["invalid-repeated keygate"], u["valid keygate"]/u["invalid-random keygate"], u["valid nginx"]/u["invalid-repeated nginx"], u["valid haproxy"]/u["invalid-repeated haproxy"], g["valid keygate"], g["invalid-repeated keygate"], g["invalid-random keygate"]
  if (u["over-limit keygate"] && u["valid keygate"]) printf "CPU per 429 (us): keygate=%.2f nginx=%.2f haproxy=%.2f; valid/429: keygate=%.2f nginx=%.2f haproxy=%.2f; wrk %%core in keygate over-limit=%d\n", u["over-limit keygate"], u["over-limit nginx"], u["over-limit haproxy"], u["valid keygate"]/u["over-limit keygate"], u["valid nginx"]/u["over-limit nginx"], u["valid haproxy"]/u["over-limit haproxy"], g["over-limit keygate"]
  if (u["cpu keygate"]) printf "CPU per request at a fixed rate (us): keygate=%.1f haproxy=%.1f nginx=%.1f\n", u["cpu keygate"], u["cpu haproxy"], u["cpu nginx"]
  if (m["limited keygate"]) printf "limited: keygate/nginx=%.2f keygate/haproxy=%.2f keygate limited/valid=%.2f; all over the limit (429s): keygate over-limit/valid=%.2f, nginx %.2f, haproxy %.2f\n", m["limited keygate"]/m["limited nginx"], m["limited keygate"]/m["limited haproxy"], m["limited keygate"]/v, m["over-limit keygate"]/v, m["over-limit nginx"]/m["valid nginx"], m["over-limit haproxy"]/m["valid haproxy"]
}' $D/medians
