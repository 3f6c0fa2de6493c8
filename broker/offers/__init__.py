"""Offers (asks): capacity that providers list."""
