"""Metrics: writers now; flops, device monitor and efficiency aggregation attach here."""
