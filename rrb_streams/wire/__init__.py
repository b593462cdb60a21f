"""Talking to Redis: URLs and connections, TLS, the RESP fast path, rrb's own keys, the change
stream's entries and consumer groups, the stored-keys index, key reads and key globs."""
