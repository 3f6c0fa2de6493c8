"""Hardware knowledge: the accelerator catalog and (later) per-vendor discovery.

Nothing in this package touches the database or the HTTP API.
"""
