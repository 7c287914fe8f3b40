"""Diffusion model, conditioning, WebDataset loader, Ray Train loop, samplers, vocoder, generation."""
