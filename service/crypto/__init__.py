"""Encryption at rest (sealing) and the key files of development."""
