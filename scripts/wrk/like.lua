-- wrk -s scripts/wrk/like.lua: POST /v1/like for random (user, item) pairs.
-- ITEMS / USERS set the key space (env), so repeats are rare and most likes change state.
local items = tonumber(os.getenv("ITEMS") or "100000")
local users = tonumber(os.getenv("USERS") or "10000000")
local path = os.getenv("LIKE_PATH") or "/v1/like"
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  local body = string.format('{"user_id":%d,"item_type":"post","item_id":%d}',
    math.random(1, users), math.random(1, items))
  return wrk.format(nil, path, nil, body)
end
