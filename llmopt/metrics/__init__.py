"""Metrics: loggers (JSON lines always, W&B when enabled), throughput and MFU."""
