"""Stage 3: per-layer metrics, trajectories, plots and reports read from stores and fitted lenses."""
