-- Store a value loaded from the database, unless an invalidation ran since the epoch was read.
-- KEYS[1] epoch   KEYS[2] index   KEYS[3] data key
-- ARGV[1] epoch read before loading   ARGV[2] value   ARGV[3] TTL in ms (0 = no expiry)
-- The value is stored behind a header that records ARGV[1] (keys.entry_header: "\0MI1\0", the
-- epoch, "\0"), so a read (and the audit) can tell an entry that outlived its epoch, e.g. one
-- restored after its invalidation.
-- Returns 1 if stored, 0 if refused (the value may predate a commit that was invalidated).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local ttl_ms = tonumber(ARGV[3])
local index_ttl_ms = redis.call('PTTL', KEYS[2])  -- -2 missing, -1 no expiry
local entry = '\0MI1\0' .. ARGV[1] .. '\0' .. ARGV[2]
if ttl_ms > 0 then
  redis.call('SET', KEYS[3], entry, 'PX', ARGV[3])
else
  redis.call('SET', KEYS[3], entry)
end
redis.call('SADD', KEYS[2], KEYS[3])
-- The index must outlive every member, or invalidation would lose track of them.
if ttl_ms == 0 then
  redis.call('PERSIST', KEYS[2])
elseif index_ttl_ms == -2 or (index_ttl_ms >= 0 and index_ttl_ms < ttl_ms) then
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return 1
