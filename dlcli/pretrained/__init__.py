"""Pretrained networks that install offline: the backbones (`backbones`), EfficientNet-Lite with
ImageNet weights (`efficientnet_lite`, read through `torch_legacy`, a restricted reader of
PyTorch files), and a perceptual image distance built on them (`image_distance`)."""
