"""The restorer (stage-1 cleaner + conditional diffusion), the log-prob DDIM sampler, the FRM and the importers."""
