"""The web dashboard (arrives with the dashboard issue)."""
