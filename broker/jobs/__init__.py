"""Jobs (bids): work that developers submit, and its life cycle."""
