"""Workflows: training a run end to end (train, calibrate, fit the review score, evaluate, write
the run) and fine-tuning a run to a lab's images. Imports: every layer below research and app."""
