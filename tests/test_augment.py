"""Batch augmentation invariants: the dihedral views form a group, translations stay in bounds."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from bloodcell.images.colour import normalize_colours, reference
from bloodcell.training import augment


def _views(x: torch.Tensor) -> list[torch.Tensor]:
    return [augment.dihedral(x, k) for k in range(8)]


def test_the_eight_dihedral_views_are_distinct_and_form_a_group():
    x = torch.randn(1, 3, 5, 5)  # no symmetry of its own
    views = _views(x)
    assert torch.equal(views[0], x)
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    for j, k in itertools.product(range(8), repeat=2):  # closure: a view of a view is a view
        composed = augment.dihedral(views[j], k)
        assert any(torch.equal(composed, v) for v in views), (j, k)
    for j in range(8):  # every view can be undone by another
        assert any(torch.equal(augment.dihedral(views[j], k), x) for k in range(8)), j


def test_random_dihedral_only_permutes_pixels_and_respects_the_switches():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 9, 9)
    out = augment.random_dihedral(x, g, flip=True, rot90=True)
    assert torch.equal(out.flatten(1).sort(dim=1).values, x.flatten(1).sort(dim=1).values)
    assert torch.equal(augment.random_dihedral(x, g, flip=False, rot90=False), x)
    flips_only = augment.random_dihedral(x, g, flip=True, rot90=False)
    for image, original in zip(flips_only, x):
        assert torch.equal(image, original) or torch.equal(image, original.flip(-1))


@pytest.mark.parametrize("shift", [1, 2, 3])
def test_translations_stay_within_the_allowed_shift(shift):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 3, 12, 12)
    out = augment.random_translate(x, shift, g)
    padded = F.pad(x, (shift,) * 4, mode="reflect")
    offsets = set()
    for i in range(len(x)):
        matches = [
            (dy, dx)
            for dy in range(2 * shift + 1)
            for dx in range(2 * shift + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + 12, dx : dx + 12])
        ]
        assert matches, f"image {i} is not a shift of at most {shift} px"
        offsets.add(matches[0])
    assert len(offsets) > 3  # and the shifts do vary
    assert torch.equal(augment.random_translate(x, 0, g), x)


def test_blur_sharpen_keeps_flat_images_and_is_off_at_zero():
    g = torch.Generator().manual_seed(2)
    flat = torch.full((8, 3, 10, 10), 0.3)
    assert torch.allclose(augment.random_sharpness(flat, 1.0, g), flat)
    x = torch.randn(8, 3, 10, 10)
    assert torch.equal(augment.random_sharpness(x, 0.0, g), x)
    assert not torch.allclose(augment.random_sharpness(x, 1.0, g), x)


def test_augment_batch_is_reproducible_from_the_generator():
    x = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    config = augment.AugmentConfig(translate=2, sharpness=1.0, colour=0.1, stain=0.2, gamma=0.3, blur=1.0, scale=0.2)
    a = augment.augment_batch(x, [0.5] * 3, [0.25] * 3, config, torch.Generator().manual_seed(3))
    b = augment.augment_batch(x, [0.5] * 3, [0.25] * 3, config, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape and torch.isfinite(a).all()


def test_stain_jitter_is_the_identity_at_zero_and_stays_in_range():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(16, 3, 12, 12)
    assert torch.equal(augment.random_stain(x, 0.0, g), x)
    out = augment.random_stain(x, 0.3, g)
    assert out.min() >= 0 and out.max() <= 1 and not torch.allclose(out, x)
    white = torch.ones(4, 3, 6, 6)  # no stain: jitter of the densities leaves white nearly white
    assert augment.random_stain(white, 0.3, g).min() > 0.9


def test_photometric_changes_keep_pixels_in_range_and_grey_stays_grey():
    g = torch.Generator().manual_seed(5)
    config = augment.AugmentConfig(brightness=0.3, contrast=0.3, gamma=0.3, saturation=0.5)
    grey = torch.rand(16, 1, 10, 10).expand(16, 3, 10, 10)
    out = augment.random_photometric(grey, config, g)
    assert out.min() >= 0 and out.max() <= 1
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])


def test_haze_flattens_images_in_8_bit_steps_and_colour_normalisation_undoes_most_of_it():
    g = torch.Generator().manual_seed(8)
    x = torch.rand(32, 3, 16, 16)
    assert torch.equal(augment.random_haze(x, 0.0, g), x)
    hazy = augment.random_haze(x, 0.9, g)
    assert hazy.min() >= 0 and hazy.max() <= 1
    assert torch.allclose(hazy * 255, (hazy * 255).round(), atol=1e-4)  # stored as 8 bits, like a photograph
    spread, hazy_spread = x.std(dim=(1, 2, 3)), hazy.std(dim=(1, 2, 3))
    assert (hazy_spread < spread).float().mean() > 0.8  # a veil lowers contrast
    target = reference((x * 255).round().to(torch.uint8))
    normalised_gap = (normalize_colours(x, target) - normalize_colours(hazy, target)).abs().mean()
    assert normalised_gap < (x - hazy).abs().mean()  # after normalisation the veiled image is closer to its original
    assert augment.AugmentConfig(haze=0.5).photometric


def test_blur_and_scale_keep_flat_images_flat():
    g = torch.Generator().manual_seed(6)
    flat = torch.full((8, 3, 14, 14), 0.4)
    assert torch.allclose(augment.random_blur(flat, 1.5, g), flat, atol=1e-6)
    assert torch.allclose(augment.random_scale(flat, 0.3, g), flat, atol=1e-6)
    x = torch.rand(8, 3, 14, 14)
    assert torch.equal(augment.random_blur(x, 0.0, g), x) and torch.equal(augment.random_scale(x, 0.0, g), x)


def test_random_convolution_keeps_each_images_shapes_and_never_mixes_images():
    g = torch.Generator().manual_seed(7)
    x = torch.zeros(6, 3, 12, 12)
    for i in range(6):  # image i: one colour left of column i + 3, another right of it
        x[i, :, :, : i + 3] = torch.rand(3, 1, 1, generator=g)
        x[i, :, :, i + 3 :] = torch.rand(3, 1, 1, generator=g)
    assert torch.equal(augment.random_convolution(x, 0.0, g), x)
    y = augment.random_convolution(x, 1.0, g, sizes=(1,))  # a 1 x 1 kernel: colours change, edges stay
    for i in range(6):
        left, right = y[i, :, :, : i + 3], y[i, :, :, i + 3 :]
        assert torch.allclose(left, left[:, :1, :1].expand_as(left), atol=1e-5)
        assert torch.allclose(right, right[:, :1, :1].expand_as(right), atol=1e-5)
        assert not torch.allclose(y[i], x[i], atol=1e-3)
    wide = augment.random_convolution(torch.rand(16, 3, 20, 20), 0.5, g)
    assert wide.shape == (16, 3, 20, 20) and torch.isfinite(wide).all()
