"""Hardware knowledge: the accelerator catalog and per-vendor discovery.

``catalog`` is the one hardware catalog. ``base`` defines the ``Adapter``
protocol and ``Device``; ``nvidia``, ``amd``, ``tpu``, ``edge`` and ``cpu`` each
implement it for one kind of hardware, and ``registry`` names them, picks the
ones that apply and runs their discovery side by side.

Nothing in this package touches the database or the HTTP API.
"""
