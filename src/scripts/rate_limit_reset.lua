-- Deletes a rate-limit key's state for the given rules (an administrator's reset).
--
-- KEYS[i] the state key of rule i, all under the key's hash tag (one slot). The override key
-- is not among them: a blocked key stays blocked.
-- Reply: how many of the keys existed.
-- UNLINK: a sliding log can hold many members; the server frees it in the background.
return redis.call('UNLINK', unpack(KEYS))
