"""Where a bench's data comes from: the synthetic joints a bench generates and prepares
(``workspace``), the unlabeled pool and the pretrainings cached on it (``pretraining``), an archive the
user points the bench at instead (``user_data``), and the held-out domains a robustness bench draws from
a manifest (``domains``). Everything here ends in prepared plane caches, splits and pretrained denoisers
that the cells then train and score on."""
