"""Broker adapters, one module each; the App finds them by URL scheme (taskframe.registry)."""
