-- wrk: every request carries one of config/bench.toml's 1,000 keys, in turn from a random start.
local n = 0
function init(args) n = math.random(0, 999) end
function request()
  n = (n + 1) % 1000
  return wrk.format("GET", nil, { ["x-api-key"] = string.format("sk_live_benchkey_%022d", n) })
end
