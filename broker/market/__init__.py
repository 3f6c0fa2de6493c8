"""The market: the order book and the hardware catalog (clearing arrives with the solver)."""
