"""Caching layers between FUSE and the store: listings and data blocks."""
