"""Per-plane 3D denoisers and their diffusion objective.

Import from the submodules (``orthodiff.models.denoiser``, ``orthodiff.models.diffusion``);
this package stays light so that importing it does not pull in torch.
"""
