-- Delete every cached key of some organizations and move each one's epoch on, atomically.
-- Per organization i (1-based), two keys and two arguments:
--   KEYS[2i-1] its epoch   KEYS[2i] its index
--   ARGV[2i-1] its namespace "<prefix>:{<org>}:"   ARGV[2i] a fresh random epoch
-- One organization per call on a Redis Cluster (each has a slot of its own); on a single server
-- one call carries many, which is most of what invalidating a batch costs the caller.
-- Returns the number of data keys deleted.
local deleted = 0
local batch = {}
-- unpack() is limited by the Lua C stack (~8000), so delete in chunks.
local function flush()
  if #batch > 0 then
    deleted = deleted + redis.call('UNLINK', unpack(batch))
    batch = {}
  end
end
for i = 1, #KEYS / 2 do
  local epoch, index = KEYS[2 * i - 1], KEYS[2 * i]
  local namespace = ARGV[2 * i - 1]
  local width = #namespace
  for _, key in ipairs(redis.call('SMEMBERS', index)) do
    -- Only names inside the namespace: a damaged index can never make us touch a foreign key, and
    -- every key deleted shares the slot of this organization's KEYS (Redis Cluster).
    if string.sub(key, 1, width) == namespace then
      batch[#batch + 1] = key
      if #batch == 1000 then
        flush()
      end
    end
  end
  flush()
  redis.call('UNLINK', index)
  -- Epoch last: on a full server with noeviction INCR is refused, but the deletes above have freed
  -- memory by then, so the caller's retry can get through.
  if redis.call('EXISTS', epoch) == 1 then
    redis.call('INCR', epoch)
  else
    redis.call('SET', epoch, ARGV[2 * i])
  end
end
return deleted
