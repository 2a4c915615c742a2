"""An event-driven order system: a saga with compensations, a CQRS read model and eventual
consistency, built on resilient-kafka and proved under chaos. See README.md."""
