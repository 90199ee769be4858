-- wrk script for bench/ingest.py: POST pre-generated EnableX webhook bodies, each one once.
--
--   wrk -t2 -c32 -d10s -s bench/wrk_post.lua http://127.0.0.1:PORT/webhooks/enablex -- BODIES
--
-- BODIES holds one request body per line. Thread k of n keeps lines k, k+n, k+2n, ... so no
-- two threads send the same event (callgate would answer a repeat as a duplicate without
-- appending). A thread that runs out wraps around and counts it in `wrapped`, which the
-- benchmark reports. done() prints one JSON line (prefixed BENCH_JSON) with the counts and
-- latency percentiles in microseconds, so nothing has to be scraped from wrk's text output.

local threads = {}
local thread_count = 0

function setup(thread)
   thread:set("id", thread_count)
   table.insert(threads, thread)
   thread_count = thread_count + 1
end

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["x-algoritm"] = "aes-256-cbc"
wrk.headers["x-format"] = "hex"
wrk.headers["x-encoding"] = "utf8"

function init(args)
   -- `id` was set by setup(); every thread's state knows the total from the main script.
   stride = tonumber(args[2] or "1")
   bodies = {}
   local n = 0
   for line in io.lines(args[1]) do
      if n % stride == id then
         table.insert(bodies, line)
      end
      n = n + 1
   end
   nbodies = #bodies
   index = 0
   ok = 0
   bad = 0
   wrapped = 0
   statuses = {}
end

function request()
   index = index + 1
   if index > nbodies then
      index = 1
      wrapped = wrapped + 1
   end
   return wrk.format(nil, nil, nil, bodies[index])
end

function response(status, headers, body)
   if status >= 200 and status < 300 then
      ok = ok + 1
   else
      bad = bad + 1
      statuses[status] = (statuses[status] or 0) + 1
   end
end

function done(summary, latency, requests)
   local ok_total, bad_total, wrapped_total = 0, 0, 0
   local by_status = {}
   for _, thread in ipairs(threads) do
      ok_total = ok_total + thread:get("ok")
      bad_total = bad_total + thread:get("bad")
      wrapped_total = wrapped_total + thread:get("wrapped")
      for status, n in pairs(thread:get("statuses")) do
         by_status[status] = (by_status[status] or 0) + n
      end
   end
   local parts = {}
   for status, n in pairs(by_status) do
      table.insert(parts, string.format('"%d":%d', status, n))
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"ok":%d,"non2xx":%d,"wrapped":%d,' ..
      '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d,' ..
      '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"non2xx_by_status":{%s}}\n',
      summary.requests, summary.duration, ok_total, bad_total, wrapped_total,
      e.connect, e.read, e.write, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
      table.concat(parts, ",")))
end
