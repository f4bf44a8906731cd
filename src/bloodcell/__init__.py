"""bloodcell: blood-cell image classification on BloodMNIST and real microscope images."""

__version__ = "0.1.0"


def load(run_dir):
    """Load a trained run: `bloodcell.load("runs/default").predict_proba(images)`."""
    from bloodcell.predict import Classifier

    return Classifier.from_run(run_dir)
