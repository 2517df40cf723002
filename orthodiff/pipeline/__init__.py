"""Prediction on new studies: the ``OrthoDiffusionPipeline`` directory and ``orthodiff predict``.

Import from the submodules (``orthodiff.pipeline.pipeline``, ``orthodiff.pipeline.predict``);
this package stays light so that importing it does not pull in torch.
"""
