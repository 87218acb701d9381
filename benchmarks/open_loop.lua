-- wrk script: one connection per thread (wrk -tN -cN), each sending on its own Poisson
-- schedule (rate `args[1]` req/s; 0: closed loop), and every request's
-- (offset s, latency ms, status, ms from its send) printed as `row,...` lines when wrk
-- is done.
--   wrk -t96 -c96 -d10s -s open_loop.lua URL -- RATE_PER_CONNECTION BODY AUTHORIZATION
-- Connections start at random phases, so their arrivals interleave instead of coming in
-- lockstep bursts (what `hey -q` sends: every connection ticks at the same instants).
-- Latency counts from the scheduled arrival when the connection was still busy with
-- the previous request then, so a slow server shows as latency, not as fewer arrivals.
local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } sf_timespec;
int clock_gettime(int clock, sf_timespec *tp);
]]
local clock = ffi.new("sf_timespec")
local function now()
  ffi.C.clock_gettime(1, clock) -- CLOCK_MONOTONIC: the same in every thread
  return tonumber(clock.tv_sec) + tonumber(clock.tv_nsec) * 1e-9
end

local threads = {}
function setup(thread)
  thread:set("index", #threads)
  threads[#threads + 1] = thread
end

local gap, due, sent, answered, started, payload
rows = {} -- read from every thread by done(): offset, latency, status, ...

function init(args)
  local rate = tonumber(args[1])
  gap = rate > 0 and 1 / rate or 0
  math.randomseed(1 + index * 7919)
  payload = wrk.format("POST", nil, {
    ["Content-Type"] = "application/json", ["Authorization"] = args[3],
  }, args[2])
  started = tonumber(args[4])
  answered = now()
end

function delay()
  if gap == 0 then
    return 0
  end
  due = (due or now()) + -math.log(1 - math.random()) * gap
  local wait = (due - now()) * 1e3
  return wait > 0 and wait or 0
end

function request()
  sent = now()
  return payload
end

function response(status)
  local t = now()
  -- late: the schedule said send while the previous request was unanswered
  local from = (due ~= nil and answered > due) and due or sent
  answered = t
  local n = #rows
  rows[n + 1], rows[n + 2], rows[n + 3], rows[n + 4] = sent - started, (t - from) * 1e3, status, (t - sent) * 1e3
end

function done()
  local out = {}
  for _, thread in ipairs(threads) do
    local got = thread:get("rows")
    for i = 1, #got, 4 do
      out[#out + 1] = string.format("row,%.6f,%.4f,%d,%.4f", got[i], got[i + 1], got[i + 2], got[i + 3])
    end
  end
  io.write(table.concat(out, "\n"), "\n")
end
