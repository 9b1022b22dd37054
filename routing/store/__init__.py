"""Storing a received instance, in order: `spool` (check, fsync, rename to a server-chosen path,
fsync the directory; `instance_store` is the entry point) → `records` (commit the rows; only then
is Success answered). `header` is the one Part 10 header reader, shared with inference.
"""
