"""Layer 1: degradation, image I/O, datasets and the procedural face world."""
