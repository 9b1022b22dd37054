"""The automation API (/api/v1/): JSON for integration engines and scripts, bearer tokens per client.

It calls the same service functions and checks the same permissions as the staff UI; nothing
below `routing`, `results` or the rest of `pacslens` imports it (import-linter contract).
"""
