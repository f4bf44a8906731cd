"""Out-of-distribution scoring: how unlike the training images a cell image looks to the model.

A confident prediction is not a trustworthy one: an image from another lab, a smudge or random
noise can get a softmax probability of 0.99. The score here is the Mahalanobis distance of the
image's features (the input of the network's final linear layer) to the nearest class centre
of the training images, with one covariance shared by all classes and shrunk with the
Ledoit-Wolf estimate (Lee et al. 2018). Its threshold is fitted on the validation split, the
in-domain images the model never trained on: above it, a prediction is flagged for review.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QUANTILE = 0.99  # of the validation scores: about 1% of in-domain images are flagged for it (with the
# confidence flag, the default model flagged 5.4% of the validation split at 0.98: above the 5% aimed for)


@dataclass(frozen=True)
class OodModel:
    """Class centres and shared precision of the training features, and the review threshold."""

    means: torch.Tensor  # (classes, features)
    precision: torch.Tensor  # (features, features)
    threshold: float

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance to the nearest class centre, per image (N,)."""
        diff = features.double()[:, None, :] - self.means.double()[None]  # (N, C, D)
        distances = torch.einsum("ncd,de,nce->nc", diff, self.precision.double(), diff)
        return distances.min(dim=1).values.float()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"means": self.means, "precision": self.precision, "threshold": torch.tensor([self.threshold])}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> OodModel:
        return cls(tensors["means"], tensors["precision"], float(tensors["threshold"][0]))


def fit(
    features: torch.Tensor,
    labels: torch.Tensor,
    val_features: torch.Tensor,
    quantile: float = QUANTILE,
    val_sources: torch.Tensor | None = None,
) -> OodModel:
    """Centres and covariance from the training features; the threshold from the validation ones.

    Only classes with training images get a centre (a model trained on lab folders alone may
    lack some). With `val_sources` (which lab each validation image comes from) the threshold is
    the largest of the labs' own quantiles: at most 1% of any training lab's held-out images are
    flagged for looking unfamiliar, however few images that lab has.
    """
    from sklearn.covariance import LedoitWolf  # only when fitting: prediction needs no scikit-learn here

    present = sorted(set(labels.tolist()))
    features = features.double()
    means = torch.stack([features[labels == c].mean(0) for c in present])
    centred = features - means[torch.searchsorted(torch.tensor(present), labels)]
    precision = torch.from_numpy(LedoitWolf(assume_centered=True).fit(centred.numpy()).precision_)
    unthresholded = OodModel(means.float(), precision.float(), float("inf"))
    scores = unthresholded.score(val_features)
    groups = [scores] if val_sources is None else [scores[val_sources == s] for s in val_sources.unique()]
    threshold = max(torch.quantile(group, quantile).item() for group in groups if len(group))
    return OodModel(means.float(), precision.float(), threshold)
