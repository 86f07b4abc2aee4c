-- wrk script for `cargo xtask bench --mode map` (fixtures/httpcache /session).
--
-- Each request carries a session id out of 1024 and six attributes, so the service parses a
-- query into a map, builds a map of attributes and folds it into a shared map of sessions:
-- some twenty plain-map writes per request besides net/http's own.
--
-- Requests are formatted once in init(); request() only picks one, to keep wrk cheap.

local reqs = {}
local i = 0
local threads = 0

function setup(thread)
  thread:set("id", threads)
  threads = threads + 1
end

function init(args)
  for k = 0, 1023 do
    reqs[k + 1] = wrk.format("GET", "/session?s=sess" .. k .. "&user=u" .. (k % 97) ..
      "&page=p" .. (k % 13) .. "&lang=en&theme=dark&ab=b" .. (k % 2) .. "&ref=r" .. (k % 7))
  end
  i = ((id or 0) * 331) % 1024
end

function request()
  i = i + 1
  if i > 1024 then i = 1 end
  return reqs[i]
end
