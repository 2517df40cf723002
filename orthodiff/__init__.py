"""orthodiff: diffusion foundation models of musculoskeletal MRI."""

__version__ = "0.1.0"
