"""The guard: samples memory, latency and the KV pool, detects leaks, drift, broken pool
invariants and stalls, and climbs a remediation ladder through the engine's commands."""
