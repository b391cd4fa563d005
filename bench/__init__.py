"""Benchmarks: luigi-creds measured side by side with a peer in the same run, reported as ratios.

Nothing here is imported by the broker or the client; `python -m bench.exchange` (`make bench`)
starts its own servers on loopback and talks to them over HTTP.
"""
