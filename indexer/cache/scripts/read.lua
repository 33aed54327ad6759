-- Read one cached value and the organization's epoch in one atomic step.
-- KEYS[1] epoch   KEYS[2] index   KEYS[3] data key
-- ARGV[1] a fresh random epoch, used only if the epoch key is missing
-- Returns {epoch, stored value or nil}.  The caller serves a stored value only if it was filled
-- under this epoch, or written without the helper (keys.servable).
--
-- The epoch is created here (random, not 0) so that a fill always compares against a value that
-- exists: if the key is later evicted and created again it gets a new random value, never the one
-- an in-flight fill holds.
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[1], epoch)
end
-- A data key that is not in the index is invisible to invalidation (index lost to eviction or
-- written behind the helper's back), so it is never served.
local value = false
if redis.call('SISMEMBER', KEYS[2], KEYS[3]) == 1 then
  value = redis.call('GET', KEYS[3])
end
return {epoch, value}
