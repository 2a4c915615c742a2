"""The five services; each runs as its own process: ``python -m examples.orders.services.<name>``."""
