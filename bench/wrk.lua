-- wrk script for the filter bench. Arguments (after `--`): the workload, `nvlink` (every request
-- carries `x-kv-backend: nvlink`, the common case) or `mix` (a fixed rotation of arms, spellings,
-- aliases and missing headers, no unknown values). Every request is a small OpenAI completion
-- POST. `done` prints one JSON line the driver parses (latencies in microseconds).
-- For the fixed-rate runs the driver wraps this file and adds a `delay` (think time).

local BODY = '{"model":"Qwen/Qwen3-Coder-30B-A3B-Instruct","prompt":"Hello","max_tokens":5}'

local MIX = {
  { ["x-kv-backend"] = "nvlink" },
  { ["x-kv-backend"] = "nvlink" },
  { ["x-kv-backend"] = "nvlink" },
  { ["x-kv-backend"] = "fs" },
  { ["x-kv-backend"] = "fs" },
  { ["x-kv-backend"] = "NVLink" },
  { ["x-kv-backend"] = "p2p" },
  { ["x-kv-backend"] = " filesystem" },
  { ["x-session-id"] = "session-1" },
  { ["x-session-id"] = "session-2" },
}

local requests = {}
local i = 0

function init(args)
  local workload = args[1] or "nvlink"
  local sets
  if workload == "nvlink" then
    sets = { { ["x-kv-backend"] = "nvlink" } }
  elseif workload == "mix" then
    sets = MIX
  else
    error("unknown workload " .. workload)
  end
  for _, extra in ipairs(sets) do
    local headers = { ["content-type"] = "application/json" }
    for k, v in pairs(extra) do headers[k] = v end
    requests[#requests + 1] = wrk.format("POST", "/v1/completions", headers, BODY)
  end
end

function request()
  i = i % #requests + 1
  return requests[i]
end

function done(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"errors":%d,"status_errors":%d,'
      .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
