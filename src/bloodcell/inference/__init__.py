"""Inference: a trained network on PyTorch or onnxruntime, `Classifier` and `PredictOptions`, the
review (out-of-distribution) score, temperature calibration, the differential count and the ONNX
export. Imports: basics, images; never anything from training."""
