"""Service dependency graphs (networkx) over aggregated service edges: the audit engine's
output, observed and repaired views. Built by the audit-engine issue; depends only on
networkx and the data handed to it (see the import contracts in pyproject.toml)."""
