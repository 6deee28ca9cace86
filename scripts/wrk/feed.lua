-- wrk -s scripts/wrk/feed.lua: POST /v1/counts for a feed of 50 random items.
local items = tonumber(os.getenv("ITEMS") or "100000")
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  local parts = {}
  for i = 1, 50 do
    parts[i] = string.format('{"item_type":"post","item_id":%d}', math.random(1, items))
  end
  return wrk.format(nil, "/v1/counts", nil,
    '{"counters":["like"],"items":[' .. table.concat(parts, ",") .. ']}')
end
