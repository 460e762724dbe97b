-- wrk script of `make bench`: each request carries the next X-Forwarded-For value of a
-- list (one address per line), so one loopback client looks like many clients behind a
-- trusted proxy. Requests are formatted once in init(): request() only picks one, which
-- keeps wrk's own CPU cost (it shares the machine with the server) small and equal for
-- every server measured.
-- Arguments after "--": METHOD PATH ADDRESS_FILE [API_KEY [FORWARDED_HOST]]
-- done() prints one line "BENCHJSON {...}" with the counts and latency percentiles.

local threads = {}
local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

local requests = {}
local count = 0
local position = 0

function init(args)
  local method, path, file, key, host = args[1], args[2], args[3], args[4], args[5]
  for line in io.lines(file) do
    local headers = { ["X-Forwarded-For"] = line }
    if key ~= nil and key ~= "" then
      headers["X-Api-Key"] = key
    end
    if host ~= nil and host ~= "" then
      headers["X-Forwarded-Host"] = host
    end
    count = count + 1
    requests[count] = wrk.format(method, path, headers)
  end
  -- Threads start at different places of the list so they do not send the same
  -- sequence in lockstep.
  position = (id * 7919) % count
end

function request()
  position = position + 1
  if position > count then
    position = 1
  end
  return requests[position]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"connect": %d, "read": %d, "write": %d, "timeout": %d, "status_errors": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
