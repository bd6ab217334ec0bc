"""stepbench: fair, audited comparison of fast samplers for diffusion models."""

__version__ = "0.1.0"
