-- What the audit needs to know of some cached keys of one organization, in one atomic step: the
-- organization's epoch and, for each key, whether it exists, whether it is indexed, and the head
-- of its value (where a value filled through the helper records the epoch it was filled under).
-- KEYS[1] epoch   KEYS[2] index   KEYS[3..] data keys (inside the index's namespace)
-- ARGV[1] how many bytes of each value to return
-- Returns {epoch or nil, then per data key: exists (0/1), indexed (0/1), head or nil}; the head is
-- nil for a key that is missing or not a string (the helper writes strings only).
local out = {redis.call('GET', KEYS[1])}
local last = tonumber(ARGV[1]) - 1
for i = 3, #KEYS do
  local head = false
  local exists = redis.call('EXISTS', KEYS[i])
  local indexed = 0
  if exists == 1 then
    indexed = redis.call('SISMEMBER', KEYS[2], KEYS[i])
    if redis.call('TYPE', KEYS[i]).ok == 'string' then
      head = redis.call('GETRANGE', KEYS[i], 0, last)
    end
  end
  out[#out + 1] = exists
  out[#out + 1] = indexed
  out[#out + 1] = head
end
return out
