"""Fine-tuning: probes on cached features, a grid of probes, partial and full fine-tuning,
for diagnosis (classify) and segmentation (segment). Entry point: ``run.run_finetune``."""
