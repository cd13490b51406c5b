"""Layer 4: BFR metrics."""
