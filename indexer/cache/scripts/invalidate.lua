-- Delete every cached key of one organization and move its epoch on, atomically.
-- KEYS[1] epoch   KEYS[2] index
-- ARGV[1] the organization's namespace "<prefix>:{<org>}:"   ARGV[2] a fresh random epoch
-- Returns the number of data keys deleted.
local namespace = ARGV[1]
local width = #namespace
local deleted = 0
local batch = {}
-- unpack() is limited by the Lua C stack (~8000), so delete in chunks.
local function flush()
  if #batch > 0 then
    deleted = deleted + redis.call('UNLINK', unpack(batch))
    batch = {}
  end
end
for _, key in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  -- Only names inside the namespace: a damaged index can never make us touch a foreign key, and
  -- every key deleted shares the slot of KEYS (Redis Cluster).
  if string.sub(key, 1, width) == namespace then
    batch[#batch + 1] = key
    if #batch == 1000 then
      flush()
    end
  end
end
flush()
redis.call('UNLINK', KEYS[2])
-- Epoch last: on a full server with noeviction INCR is refused, but the deletes above have freed
-- memory by then, so the caller's retry can get through.
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('INCR', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
return deleted
