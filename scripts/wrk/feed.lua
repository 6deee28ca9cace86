-- wrk -s scripts/wrk/feed.lua URL: POST /v1/counts for a feed of 50 items drawn by Zipf popularity
-- (s=1, the inverse of the continuous CDF as in tally_dev/bench/workloads.py) and, unless
-- COUNTS_ONLY=1, the viewer's has-liked of the same 50 (one request, as the bench's feed preset).
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "report.lua")
local items = tonumber(os.getenv("ITEMS") or "10000000")
local users = tonumber(os.getenv("USERS") or "1000000000")
local log_n = math.log(items + 1)
local counts_only = os.getenv("COUNTS_ONLY") == "1"
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  local parts = {}
  for i = 1, 50 do
    local item = math.floor(math.exp(math.random() * log_n))
    if item < 1 then item = 1 elseif item > items then item = items end
    parts[i] = string.format('{"item_type":"post","item_id":%d}', item)
  end
  local viewer = ""
  if not counts_only then viewer = string.format(',"user_id":%d', math.random(1, users)) end
  return wrk.format(nil, "/v1/counts", nil,
    '{"counters":["like"],"items":[' .. table.concat(parts, ",") .. ']' .. viewer .. '}')
end
