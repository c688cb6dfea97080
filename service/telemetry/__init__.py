"""Traces, metrics and logs, each through the one redaction policy."""
