"""PNG figures of results (matplotlib, Agg backend: no display needed)."""
