-- Index keys of organizations' namespaces that the fill helper did not necessarily write (the
-- key tracker, tracker.py): fill.lua's bookkeeping, without writing a value.
-- KEYS[2i-1] an index   KEYS[2i] a data key inside that index's namespace (checked by the caller)
-- On a single server one call indexes many keys, and KEYS[2n+1], when there, is the registry:
-- ARGV (the keys' organizations) are added to it first, registered before indexed as the
-- readers do.  On a Redis Cluster one call per key (each organization has a slot of its own).
-- Returns the positions i of the keys that were not in their index yet (a key the fill helper
-- wrote is; a key already gone is skipped): only those can have escaped a delete.
if #KEYS % 2 == 1 then
  redis.call('SADD', KEYS[#KEYS], unpack(ARGV))
end
local added = {}
for i = 1, math.floor(#KEYS / 2) do
  local index, key = KEYS[2 * i - 1], KEYS[2 * i]
  local key_ttl_ms = redis.call('PTTL', key)  -- -2 missing, -1 no expiry
  if key_ttl_ms ~= -2 then  -- (-2: deleted meanwhile, e.g. by an invalidation: nothing to delete)
    local index_ttl_ms = redis.call('PTTL', index)
    if redis.call('SADD', index, key) == 1 then
      added[#added + 1] = i
    end
    -- The index must outlive every member, or invalidation would lose track of them.
    if key_ttl_ms == -1 then
      redis.call('PERSIST', index)
    elseif index_ttl_ms == -2 or (index_ttl_ms >= 0 and index_ttl_ms < key_ttl_ms) then
      redis.call('PEXPIRE', index, key_ttl_ms)
    end
  end
end
return added
