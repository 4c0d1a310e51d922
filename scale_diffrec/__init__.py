"""scale_diffrec: latent diffusion recommenders at catalogue scale."""
__version__ = "0.1.0"
