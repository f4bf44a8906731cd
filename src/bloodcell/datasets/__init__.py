"""Datasets: BloodMNIST files (official, downloaded and checked), the PBC rebuild at 64-224 px, and
labelled folders of lab images, all as uint8 tensors in memory. Imports: basics, images."""
