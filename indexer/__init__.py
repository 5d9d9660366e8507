"""Scanning, safe decoding, embedding and the LMDB store."""

__version__ = "0.1.0"
