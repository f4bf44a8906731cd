"""bloodcell: blood-cell image classification on BloodMNIST and real microscope images."""

__version__ = "0.2.0"


def load(run_dir=None, precision: str = "float32", compile: bool = False, backend: str = "torch", device: str = "cpu"):
    """Load a trained run: `bloodcell.load("runs/default").predict_files(["cells/"])`.

    With no `run_dir`, the model packaged with bloodcell (the default recipe, `bloodcell.runs.PACKAGED_RUN`).

    `precision="bfloat16"` is about 2.5x faster for bulk inference on CPUs with AVX512-BF16 or AMX;
    `backend="onnx"` runs the run's exported model.onnx; `device="auto"` uses a GPU if there is one.
    See `bloodcell.predict.Classifier.from_run`.
    """
    from bloodcell.predict import Classifier

    return Classifier.from_run(run_dir, precision, compile, backend, device)
