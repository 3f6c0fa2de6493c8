"""The broker service: API, domain services and persistence."""
