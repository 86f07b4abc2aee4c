-- wrk script for `cargo xtask bench --mode cas` (fixtures/casservice /hit).
--
-- Every request is the same GET /hit, formatted once in init() to keep wrk cheap; the service
-- updates its lock-free statistics with CAS loops on each.

local req

function init(args)
  req = wrk.format("GET", "/hit")
end

function request()
  return req
end
