"""Evaluation: metrics, scoring a classifier on a split or on labelled lab images, and accuracy
under corruptions. Imports: basics, images, datasets, inference."""
