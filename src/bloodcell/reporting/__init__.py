"""Reporting: every figure in one style, the HTML report, Grad-CAM explanations and the data
figures. Imports: basics, images, datasets, inference, evaluation."""
