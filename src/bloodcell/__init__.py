"""bloodcell: blood-cell image classification on BloodMNIST and real microscope images.

The public API is importable from here; each name is loaded on first use, so `import bloodcell`
stays light and classifying never imports the training code:

    bloodcell.load(run)                  a trained run as a `Classifier` (no run: the packaged model)
    Classifier, PredictOptions           classifying tensors, images and files
    load_data(data_dir, size)            BloodMNIST as uint8 tensors (`datasets.bloodmnist.load`)
    TrainConfig, PRESETS, train_run      training a run directory
    FinetuneConfig, finetune             adapting a run to a lab's labelled images
    evaluate, score_records              scoring on a split / on labelled images
    differential                         the differential count of classified cells
"""

from importlib import import_module

__version__ = "0.2.0"

_API = {
    "Classifier": "bloodcell.inference.classifier",
    "PredictOptions": "bloodcell.inference.classifier",
    "load_data": ("bloodcell.datasets.bloodmnist", "load"),
    "TrainConfig": "bloodcell.training.recipe",
    "PRESETS": "bloodcell.training.recipe",
    "train_run": "bloodcell.workflows.pipeline",
    "FinetuneConfig": "bloodcell.workflows.finetune",
    "finetune": "bloodcell.workflows.finetune",
    "evaluate": "bloodcell.evaluation.scoring",
    "score_records": "bloodcell.evaluation.scoring",
    "differential": "bloodcell.inference.differential",
}
__all__ = ["__version__", "load", *_API]


def load(run_dir=None, precision: str = "float32", compile: bool = False, backend: str = "torch", device: str = "cpu"):
    """Load a trained run: `bloodcell.load("runs/default").predict_files(["cells/"])`.

    With no `run_dir`, the model packaged with bloodcell (`bloodcell.runs.PACKAGED_RUN`).

    `precision="bfloat16"` is about 2.5x faster for bulk inference on CPUs with AVX512-BF16 or AMX;
    `backend="onnx"` runs the run's exported model.onnx; `device="auto"` uses a GPU if there is one.
    See `bloodcell.inference.classifier.Classifier.from_run`.
    """
    from bloodcell.inference.classifier import Classifier

    return Classifier.from_run(run_dir, precision, compile, backend, device)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'bloodcell' has no attribute {name!r}")
    module, attribute = _API[name] if isinstance(_API[name], tuple) else (_API[name], name)
    return getattr(import_module(module), attribute)


def __dir__() -> list[str]:
    return sorted(__all__)
