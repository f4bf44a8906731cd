"""bloodcell: blood-cell image classification on BloodMNIST and real microscope images."""

__version__ = "0.1.0"
