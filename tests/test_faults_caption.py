"""captions:DIR keeps to DIR/images/: an image name with '..' or an absolute path is refused by name."""

import pytest
from PIL import Image

from dlcli.errors import UsageError
from dlcli.tasks.caption import read_caption_folder


@pytest.mark.parametrize("hostile", ["../secret.png", "sub/../../secret.png", "/etc/passwd"])
def test_image_names_outside_the_images_folder_are_refused_by_name(tmp_path, hostile):
    folder = tmp_path / "caps"
    (folder / "images" / "sub").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(folder / "images" / name)
    Image.new("RGB", (8, 8)).save(folder / "secret.png")  # exists, outside images/
    (folder / "captions.txt").write_text(f"image,caption\na.png,a cat\nb.png,a dog\n{hostile},a secret\n")
    with pytest.raises(UsageError, match="outside") as info:
        read_caption_folder(str(folder))
    assert repr(hostile) in str(info.value)


def test_names_inside_the_folder_are_read(tmp_path):
    folder = tmp_path / "caps"
    (folder / "images" / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.png"):
        Image.new("RGB", (8, 8)).save(folder / "images" / name)
    (folder / "captions.txt").write_text("image,caption\na.png,a cat\nsub/b.png,a dog\n")
    assert read_caption_folder(str(folder)) == {"a.png": ["a cat"], "sub/b.png": ["a dog"]}
