"""Layer 5: trainers and their shared plumbing (accelerate, checkpoints, logging)."""
