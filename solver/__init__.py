"""Market clearing: plain data in, assignments out (arrives with the solver issue)."""
