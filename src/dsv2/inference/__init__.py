"""Inference on the model: sampling and batched generation over the latent cache."""
