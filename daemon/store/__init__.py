"""Durable state: conversions, arrivals, deliveries and attempts (see store.base)."""
