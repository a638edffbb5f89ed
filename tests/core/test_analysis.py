"""Seed 001's analyses: clustering metrics by hand, separability on LC25000, Grad-CAM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from napari_lnmeta.core.gradcam import find_target_layer, gradcam, gradcam_region_job
from napari_lnmeta.core.metrics import adjusted_rand_index, hungarian_accuracy, silhouette_score
from napari_lnmeta.core.separability import (
    SeparabilityConfig,
    kmeans,
    pca,
    separability_job,
)
from napari_lnmeta.errors import InputError
from napari_lnmeta.progress import run


def test_hungarian_accuracy_by_hand():
    assert hungarian_accuracy([0, 0, 1, 1], [1, 1, 0, 0]) == 1.0   # swapped names
    assert hungarian_accuracy([0, 0, 1, 1], [0, 1, 0, 1]) == 0.5   # no information
    # 3 classes: the best matching is a->2, b->0, c->1 with 2 + 2 + 1 correct of 6
    assert hungarian_accuracy(list("aabbcc"), [2, 2, 0, 0, 2, 1]) == pytest.approx(5 / 6)
    assert hungarian_accuracy(["x", "y"], ["k", "k"]) == 0.5


def test_adjusted_rand_index_by_hand():
    from sklearn.metrics import adjusted_rand_score

    # contingency [[2, 1, 0], [0, 1, 2]]: index 2, rows 2 * C(3,2) = 6, cols 3 * C(2,2) = 3,
    # expected 6 * 3 / C(6,2) = 1.2, max (6 + 3) / 2 = 4.5 -> (2 - 1.2) / (4.5 - 1.2)
    a, b = [0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]
    assert adjusted_rand_index(a, b) == pytest.approx(0.8 / 3.3)
    assert adjusted_rand_index([0, 0, 1, 1], [5, 5, 3, 3]) == 1.0
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 3, 500), rng.integers(0, 4, 500)
    assert adjusted_rand_index(x, y) == pytest.approx(adjusted_rand_score(x, y))
    assert abs(adjusted_rand_index(x, y)) < 0.05


def test_silhouette_by_hand():
    from sklearn.metrics import silhouette_score as sk

    # points 0, 1 | 10, 11: s(0) = (10.5 - 1) / 10.5, s(1) = (9.5 - 1) / 9.5, symmetric
    x = np.array([[0.0], [1.0], [10.0], [11.0]])
    want = ((10.5 - 1) / 10.5 + (9.5 - 1) / 9.5) / 2
    assert silhouette_score(x, [0, 0, 1, 1]) == pytest.approx(want)
    # a point alone in its cluster scores 0
    assert silhouette_score(np.array([[0.0], [1.0], [10.0]]), [0, 0, 1]) == pytest.approx(
        ((10 - 1) / 10 + (9 - 1) / 9) / 3)
    rng = np.random.default_rng(0)
    pts, lab = rng.normal(size=(301, 4)), rng.integers(0, 3, 301)
    assert silhouette_score(pts, lab, chunk=50) == pytest.approx(sk(pts, lab))
    with pytest.raises(InputError, match="clusters"):
        silhouette_score(pts, np.zeros(301))


def test_pca_and_kmeans():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.3, (40, 5))
    b = rng.normal(0, 0.3, (40, 5)) + 4.0
    x = np.concatenate([a, b])
    coords, ratio = pca(x, 2)
    assert coords.shape == (80, 2) and ratio[0] > 0.9 and ratio[0] >= ratio[1]
    lab, centres, inertia = kmeans(coords, 2, seed=3)
    assert hungarian_accuracy(np.r_[np.zeros(40), np.ones(40)], lab) == 1.0
    lab2, _, inertia2 = kmeans(coords, 2, seed=3)
    np.testing.assert_array_equal(lab, lab2)
    assert inertia == pytest.approx(inertia2) and centres.shape == (2, 2)


def test_separability_lc25000_and_stain_normalisation(shared_data):
    """Benign vs adenocarcinoma LC25000 patches: the colour shortcut makes them separable
    (PROVENANCE.md); Macenko normalisation takes most of it away."""
    lc = shared_data / "lc25000_lung_224" / "images"
    cfg = SeparabilityConfig(backbone="resnet18", patch_size=64, max_patches=30, seed=0)
    res = run(separability_job(lc / "lung_n", lc / "lung_aca", cfg))
    raw, norm = res["raw"], res["normalised"]
    assert raw.names == ("lung_n", "lung_aca") and len(raw.source) == 60
    assert raw.accuracy > 0.8 and raw.ari > 0.4
    assert norm.stain == "macenko" and norm.ari < raw.ari - 0.2
    for r in (raw, norm):
        assert 0.5 <= r.accuracy <= 1 and -1 <= r.silhouette <= 1 and r.coords.shape == (60, 2)


class Toy(nn.Module):
    """Channel 0 fires on red, channel 1 on blue; class 1 = red, class 0 = blue."""

    def __init__(self):
        super().__init__()
        conv = nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            conv.weight.copy_(torch.tensor([[1.0, -1.0, -1.0], [-1.0, -1.0, 1.0]])[..., None, None])
            conv.bias.zero_()
        self.features = nn.Sequential(conv, nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def test_gradcam_highlights_what_a_toy_model_responds_to():
    x = torch.zeros(1, 3, 32, 32)
    x[0, 0, 2:10, 2:10] = 1.0      # red square, top left
    x[0, 2, 20:30, 20:30] = 1.0    # blue square, bottom right
    model = Toy()
    assert find_target_layer(model, x) is model.features
    red = gradcam(model, x, class_index=1)[0]
    blue = gradcam(model, x, class_index=0)[0]
    assert red.shape == (32, 32) and red.min() >= 0 and red.max() == pytest.approx(1.0)
    assert red[4:8, 4:8].min() > 0.9 and red[22:28, 22:28].max() < 1e-6
    assert blue[22:28, 22:28].min() > 0.9 and blue[4:8, 4:8].max() < 1e-6
    # default: each patch's predicted class (more blue pixels: class 0)
    np.testing.assert_allclose(gradcam(model, x)[0], blue, atol=1e-6)
    assert model.training  # left as it was


@pytest.mark.parametrize("arch,layer", [("resnet18", "layer4"), ("lnmeta_cnn_small", "layer4"),
                                        ("mobilenet_v3_small", "features")])
def test_gradcam_on_registry_architectures(arch, layer, cmu1):
    from napari_lnmeta.io.slide import open_slide
    from napari_lnmeta.models.registry import build_model

    torch.manual_seed(0)
    model = build_model(arch, 2).eval()
    slide = open_slide(cmu1)
    patches = np.stack([slide.read_region((y, 600), (64, 64)) for y in (400, 800, 1200)])
    x = torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255
    assert find_target_layer(model, x) is getattr(model, layer)
    cams, probs = gradcam(model, patches, return_probs=True, out_size=16)
    assert cams.shape == (3, 16, 16) and cams.dtype == np.float32
    assert cams.min() >= 0 and cams.max() <= 1 and np.isfinite(cams).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)


def test_gradcam_of_a_slide_region_lies_on_the_slide(cmu1):
    from napari_lnmeta.io.frame import layer_transform
    from napari_lnmeta.io.slide import open_slide
    from napari_lnmeta.models.io import default_model_path, load_model

    slide = open_slide(cmu1)
    model, meta = load_model(default_model_path())
    side0 = meta.patch_size * meta.mpp / slide.mpp
    cam, frame, info = run(gradcam_region_job(slide, model, meta, (0, 0, 2 * side0, 3 * side0),
                                              cam_px=16))
    assert info["grid"] == [2, 3] and cam.shape == (32, 48)
    assert cam.min() >= 0 and cam.max() <= 1 and info["probability"].shape == (2, 3)
    assert frame.downsample == pytest.approx(side0 / 16) and frame.slide_mpp == slide.mpp
    tr = layer_transform(frame)
    # cam pixel (0, 0) covers level-0 [0, side0/16): its centre in µm
    assert tr["translate"][0] == pytest.approx((side0 / 16 - 1) / 2 * slide.mpp)
    # too many patches for the budget: a centred sub-box, noted
    cam2, _, info2 = run(gradcam_region_job(slide, model, meta, (0, 0) + slide.shape,
                                            max_patches=4, cam_px=8))
    assert info2["n_patches"] <= 4 and info2["notes"]
