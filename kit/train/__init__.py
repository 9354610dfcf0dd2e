"""Training: run plan, the one trainer, pre-flight checks, logs, mini alignment."""
