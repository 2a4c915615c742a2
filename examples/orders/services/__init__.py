"""The five services, each its own process: ``python -m examples.orders.services.<name>``."""
