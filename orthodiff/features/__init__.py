"""Denoiser features: seeded extraction (``extractor``) and the on-disk feature store (``store``)."""
