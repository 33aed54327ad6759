-- Index a key of an organization's namespace that the fill helper did not necessarily write (the
-- key tracker, tracker.py): fill.lua's bookkeeping, without writing a value.
-- KEYS[1] index   KEYS[2] data key (inside the index's namespace, checked by the caller)
-- Returns 1 if the key exists (and is now indexed), 0 if it is already gone.
local key_ttl_ms = redis.call('PTTL', KEYS[2])  -- -2 missing, -1 no expiry
if key_ttl_ms == -2 then
  return 0  -- deleted meanwhile (e.g. by an invalidation): nothing left to delete
end
local index_ttl_ms = redis.call('PTTL', KEYS[1])
redis.call('SADD', KEYS[1], KEYS[2])
-- The index must outlive every member, or invalidation would lose track of them.
if key_ttl_ms == -1 then
  redis.call('PERSIST', KEYS[1])
elseif index_ttl_ms == -2 or (index_ttl_ms >= 0 and index_ttl_ms < key_ttl_ms) then
  redis.call('PEXPIRE', KEYS[1], key_ttl_ms)
end
return 1
