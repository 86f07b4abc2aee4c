-- wrk script for `cargo xtask bench --mode lock` (fixtures/httpcache).
--
-- Spreads requests over the fixture's hot key set (`-keys`, 64 by default): each request asks
-- for /item?k=keyN with N cycling through 0..keys-1 from a different start per thread, so every
-- key is hit evenly, the shared cache stays warm (one entry rebuilt every 50th get of a key,
-- outside the lock) and all connections fight for the one cache mutex.
--
-- The requests are formatted once in init(): request() only picks one, which keeps wrk's own CPU
-- cost low on a 2-core box where wrk and the service compete for the same CPUs.
--
-- Script argument (after `--`): the number of hot keys (default 64, the fixture's default).

local reqs = {}
local i = 0
local threads = 0

-- Runs in wrk's main state once per thread: gives each thread its own start key.
function setup(thread)
  thread:set("id", threads)
  threads = threads + 1
end

function init(args)
  local n = tonumber(args[1]) or 64
  for k = 0, n - 1 do
    reqs[k + 1] = wrk.format("GET", "/item?k=key" .. k)
  end
  i = ((id or 0) * 17) % n
end

function request()
  i = i % #reqs + 1
  return reqs[i]
end
