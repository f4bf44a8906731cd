"""Training: recipes (`TrainConfig`, presets), whole-batch augmentation on tensors, the one
training loop, resumable checkpoints and distributed training. Imports: basics, images,
datasets, inference."""
