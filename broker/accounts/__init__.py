"""Accounts, roles and API keys."""
