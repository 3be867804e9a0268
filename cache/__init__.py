"""Stage 1: one model pass that writes the residual stream, tokens and final distribution to a store."""
