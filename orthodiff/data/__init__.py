"""From archive to plane tensors: scan, prepare, split, datasets."""
