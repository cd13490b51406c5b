"""Layer 2: the restorer (stage-1 cleaner + conditional diffusion) and the log-prob DDIM sampler."""
