"""Ingest: deliveries (CSV, DDEX), their expectations, the per-record steps, ``rights explain``."""
