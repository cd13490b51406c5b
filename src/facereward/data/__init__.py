"""Degradation, image I/O, datasets, the training-data config and the procedural face world."""
