"""The models: the VAE interface and its registry, the architectures, losses, feature networks,
the fitted latent prior, and what a model draws. No optimiser, device, precision or logging code."""
