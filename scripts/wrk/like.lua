-- wrk -s scripts/wrk/like.lua URL: POST /v1/like for random (user, item) pairs, items uniform.
-- ITEMS / USERS set the key space (env), so repeats are rare and most likes change state;
-- VIRAL (0..1, default 0) sends that share of the likes to item 1 (the bench's viral preset).
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "report.lua")
local items = tonumber(os.getenv("ITEMS") or "10000000")
local users = tonumber(os.getenv("USERS") or "1000000000")
local viral = tonumber(os.getenv("VIRAL") or "0")
local path = os.getenv("LIKE_PATH") or "/v1/like"
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  local item = 1
  if viral == 0 or math.random() >= viral then item = math.random(2, items) end
  local body = string.format('{"user_id":%d,"item_type":"post","item_id":%d}',
    math.random(1, users), item)
  return wrk.format(nil, path, nil, body)
end
