"""Writing a bench's report from its results rows and run directories: pooled scores with bootstrap
intervals (``results``), what the splits can resolve (``protocol``), how learnable each label is
(``learnability``), whether training and pretraining curves settled (``curves``, ``training_report``,
``pretraining_report``), the segmentation section (``segmentation_report``) and the plots (``plots``).
Nothing here trains; it reads what the cells wrote."""
