"""Example systems built on resilient-kafka, using only its public API."""
