-- Delete cached keys of one organization that the audit found stale, if they still are: each still
-- starts with the header it was seen with, and that header's epoch is not the organization's
-- epoch.  A key filled again meanwhile (a new header) or an epoch that came back is left alone.
-- KEYS[1] epoch   KEYS[2] index   KEYS[3..] data keys (inside the index's namespace)
-- ARGV[2i-1] the header key i was seen with   ARGV[2i] the epoch that header records
-- Returns the number of keys deleted.
local epoch = redis.call('GET', KEYS[1])
local deleted = 0
for i = 3, #KEYS do
  local header = ARGV[2 * (i - 2) - 1]
  local recorded = ARGV[2 * (i - 2)]
  if recorded ~= epoch and redis.call('TYPE', KEYS[i]).ok == 'string'
      and redis.call('GETRANGE', KEYS[i], 0, #header - 1) == header then
    deleted = deleted + redis.call('UNLINK', KEYS[i])
    redis.call('SREM', KEYS[2], KEYS[i])
  end
end
return deleted
