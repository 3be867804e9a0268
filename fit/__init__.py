"""Stage 2: lenses, causal bases and probes fitted out of core from a store (no model needed)."""
