"""Task `caption`: image captioning with a pretrained CNN encoder and an LSTM decoder.

Week 6 of the course. The encoder is a pretrained backbone (see `dlcli.pretrained.backbones`):
EfficientNet-Lite0 by default, whose ImageNet weights install with dlcli, on the 224x224
centre crop, with global average pooling; the course's InceptionV3 is `--backbone
inception_v3 --image-size 299` where Keras can fetch its weights. It is never trained,
so every image's embedding is computed once and cached on disk, keyed by the
backbone, its weights, the input size and the list of images: later epochs and later runs
train only the decoder. The cache lives beside the runs (`<runs-dir>/caption/
.embeddings/`) unless `cache_dir` says otherwise.

The decoder is the course's: embedding -> dense 120 elu -> dense 300 elu as the LSTM's
initial state (h and c); words embedded in 100 dimensions; LSTM 300; dense 120 elu ->
vocabulary logits; the loss is averaged over real tokens only (padding masked out). Two
additions: the image embedding is standardised with the training set's mean and variance
first, which keeps the decoder's start sane whatever the encoder's scale; and dropout
(`dropout`, 0.5) on the image embedding, the word embeddings and the LSTM's outputs, without
which the decoder overfits a few thousand captions within 5 epochs (measured on Flickr8k:
held-out next-word accuracy 0.342 at its best epoch and 0.325 after 20 epochs without it).
Training images are seen in `train_views` cached views (centre, mirror, random crops; see
`views_of`), one per caption and epoch, and Adam's rate falls along a per-epoch half cosine:
0.366 against the text-only bigram's 0.322 (README).

Vocabulary as in the course: lower-case, split on non-word characters, words seen at least
`min_word_count` times in training captions, plus #PAD#, #UNK#, #START#, #END#; saved
with the run. Captions are cut at `max_caption_tokens` tokens (#START# and #END# included).

Data: tensorflow-datasets `coco_captions` (train split, `val` held out), or
`captions:DIR` with `DIR/images/` and `DIR/captions.txt` (CSV `image,caption`, the
Flickr8k layout), of which a seeded `holdout` fraction of the images is held out. `eval`
on a folder other than the run's scores every image of it.

Decoding: greedy, sampling with a temperature (p ** (1/t), renormalised), or beam search;
#UNK#, #PAD# and #START# are never generated. `eval` scores held-out images against all
their reference captions with corpus BLEU-1..4 and next-word accuracy, beside a trivial
baseline: the single most common training caption for every image (BLEU), and the most
common next word after the previous one in training captions (next-word accuracy).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import textwrap
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlcli.pretrained import backbones
from dlcli.data import sources as data_lib
from dlcli.engine import schedules
from dlcli.engine import training
from dlcli.inference import lite
from dlcli.errors import UsageError
from dlcli.data.images import in_input_order, read_image, read_many
from dlcli.engine.lazy import lazy_import
from dlcli.runs.files import atomic_write_json, atomic_write_npz
from dlcli.tasks import Context, DataRules, ExportSpec, FileInputs, Option, TaskSpec, View, common_defaults

keras = lazy_import("keras")
tf = lazy_import("tensorflow")
tfds = lazy_import("tensorflow_datasets")

DEFAULTS = {
    **common_defaults(dataset="coco_captions", epochs=24, batch_size=64, lr=2e-3),
    **training.keras_defaults(),
    **backbones.backbone_defaults(image_size=224),
    "holdout": 0.2,
    "max_images": 0,
    "cache_dir": None,
    "min_word_count": 5,
    "max_caption_tokens": 20,
    "bottleneck": 120,
    "lstm_units": 300,
    "word_embedding": 100,
    "logit_bottleneck": 120,
    "dropout": 0.5,  # on the image embedding, the word embeddings and the LSTM's outputs (training only)
    "eval_beam": 3,
    "train_views": 6,  # crops of each training image whose embeddings are cached; one drawn per caption an epoch
}
CHOICES = {"backbone": backbones.NAMES}
PAD, UNK, START, END = "#PAD#", "#UNK#", "#START#", "#END#"
SPECIALS = [PAD, UNK, START, END]
PAD_ID, UNK_ID, START_ID, END_ID = range(4)
LENGTH_ALPHA = 0.7  # beam search ranks finished captions by log p / length ** 0.7


# -- text ----------------------------------------------------------------------------------


def tokenize(text: str) -> list[str]:
    """The course's rule: lower-case, split on non-word characters, drop empty pieces."""
    return [w for w in re.split(r"\W+", text.lower()) if w]


def build_vocab(captions: list[str], min_count: int) -> list[str]:
    counts = Counter(w for c in captions for w in tokenize(c))
    return SPECIALS + sorted(w for w, n in counts.items() if n >= min_count)


def encode(captions: list[str], vocab: list[str], max_tokens: int) -> np.ndarray:
    """Captions -> int32 (N, max_tokens): #START# words... #END# #PAD#..., cut to fit."""
    index = {w: i for i, w in enumerate(vocab)}
    out = np.full((len(captions), max_tokens), PAD_ID, np.int32)
    for row, caption in enumerate(captions):
        ids = [index.get(w, UNK_ID) for w in tokenize(caption)][: max_tokens - 2]
        out[row, : len(ids) + 2] = [START_ID, *ids, END_ID]
    return out


def decode_ids(ids, vocab: list[str]) -> list[str]:
    words = []
    for i in ids:
        if i == END_ID:
            break
        if i not in (PAD_ID, START_ID):
            words.append(vocab[i])
    return words


# -- BLEU ----------------------------------------------------------------------------------


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i: i + n]) for i in range(len(words) - n + 1))


def corpus_bleu(references: list[list[list[str]]], hypotheses: list[list[str]], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..max_n (Papineni et al. 2002), no smoothing: [BLEU-1, ..., BLEU-max_n].

    n-gram counts are clipped by their most in any one reference and summed over the corpus;
    the brevity penalty uses, per sentence, the reference length closest to the hypothesis
    (the shorter on a tie). BLEU-n is that penalty times the geometric mean of p_1..p_n.
    """
    if len(references) != len(hypotheses):
        raise ValueError("one list of references per hypothesis")
    matched, total = np.zeros(max_n), np.zeros(max_n)
    hyp_len = ref_len = 0
    for refs, hyp in zip(references, hypotheses):
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1] if refs else 0
        for n in range(1, max_n + 1):
            counts = _ngrams(hyp, n)
            most = Counter()
            for ref in refs:
                most |= _ngrams(ref, n)
            matched[n - 1] += sum(min(c, most[g]) for g, c in counts.items())
            total[n - 1] += max(len(hyp) - n + 1, 0)
    if hyp_len == 0:
        return [0.0] * max_n
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    scores, log_sum = [], 0.0
    for n in range(max_n):
        if matched[n] == 0 or total[n] == 0:
            scores.extend([0.0] * (max_n - n))
            break
        log_sum += math.log(matched[n] / total[n])
        scores.append(brevity * math.exp(log_sum / (n + 1)))
    return scores


# -- data ----------------------------------------------------------------------------------


@dataclass
class CaptionData:
    """Image ids with their captions, split into training and held-out images."""

    kind: str  # "captions" or "tfds"
    source: str  # folder path or tfds name
    train: list[tuple[str, list[str]]]
    heldout: list[tuple[str, list[str]]]
    train_split: str = ""
    heldout_split: str = ""


def read_caption_folder(path: str) -> dict[str, list[str]]:
    """`DIR/captions.txt` (CSV `image,caption`) -> {image file name: [captions]}, images checked."""
    root = Path(path)
    table, images = root / "captions.txt", root / "images"
    if not table.is_file() or not images.is_dir():
        raise UsageError(f"{path} is not a captions folder: expected {path}/images/ and {path}/captions.txt "
                         "(CSV with header image,caption)")
    captions: dict[str, list[str]] = defaultdict(list)
    with open(table, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
            raise UsageError(f"{table} must be a CSV with the header image,caption (got {reader.fieldnames})")
        for row in reader:
            if row["image"] and row["caption"] and row["caption"].strip():
                captions[row["image"].strip()].append(row["caption"].strip())
    # Image names are paths inside DIR/images/: an absolute path or a '..' would read any file.
    outside = [name for name in captions if Path(name).is_absolute() or ".." in Path(name).parts]
    if outside:
        raise UsageError(f"{table} names {len(outside)} images outside {images} (first: {outside[0]!r}); "
                         "image names must be paths inside that folder")
    missing = [name for name in captions if not (images / name).is_file()]
    if missing:
        raise UsageError(f"{table} names {len(missing)} images missing from {images} (first: {missing[0]})")
    if len(captions) < 2:
        raise UsageError(f"{table} must caption at least 2 images")
    return dict(captions)


def _coco_captions(builder, split: str, limit: int) -> list[tuple[str, list[str]]]:
    ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()}, shuffle_files=False)
    if limit:
        ds = ds.take(limit)
    return [(str(int(ex["image/id"])), [t.decode() for t in ex["captions"]["text"]]) for ex in ds.as_numpy_iterator()]


def load_data(cfg: dict, hold_out_all: bool = False) -> CaptionData:
    """The data split into training and held-out images; `hold_out_all`: every image of a
    captions folder held out (for `eval` on a folder the run did not train on)."""
    kind, value = data_lib.parse_dataset(cfg["dataset"], allowed=("tfds", "captions"))
    if kind == "captions":
        captions = read_caption_folder(value)
        names = sorted(captions)
        order = np.random.default_rng(cfg["seed"]).permutation(len(names))
        if cfg["max_images"] and not hold_out_all:
            order = order[: cfg["max_images"]]
        n_held = len(order) if hold_out_all else min(max(1, round(len(order) * cfg["holdout"])), len(order) - 1)
        held = sorted(names[i] for i in order[:n_held])
        train = sorted(names[i] for i in order[n_held:])
        return CaptionData(kind, value, [(n, captions[n]) for n in train], [(n, captions[n]) for n in held])
    builder = data_lib.tfds_builder(value, cfg["data_dir"])
    splits = list(builder.info.splits.keys())
    train_split = data_lib.pick_split(splits, ("train",), value)
    held_split = data_lib.pick_split(splits, ("val", "validation", "test"), value)
    limit = cfg["max_images"]
    return CaptionData(kind, value, _coco_captions(builder, train_split, limit),
                       _coco_captions(builder, held_split, max(limit // 10, 1) if limit else 0),
                       train_split, held_split)


def _images(cfg: dict, data: CaptionData, items: list[tuple[str, list[str]]], split: str):
    """Yield (id, uint8 RGB image) for the given images, in order, at their own size."""
    if data.kind == "captions":
        folder = Path(data.source) / "images"
        for name, _ in items:
            yield name, read_image(folder / name, mode="RGB")
        return
    builder = data_lib.tfds_builder(data.source, cfg["data_dir"])
    for ex in builder.as_dataset(split=split, shuffle_files=False).take(len(items)).as_numpy_iterator():
        yield str(int(ex["image/id"])), ex["image"][..., :3]


def views_of(image: np.ndarray, image_id: str, size: int, count: int) -> list[np.ndarray]:
    """`count` square uint8 crops of one image: its centre, the centre's mirror image, then
    random crops (40-100 % of the largest square's area, anywhere in the image) each followed
    by its mirror image. The crops depend on the image's id alone, so a cache stays valid."""
    centre = backbones.crop_resize(image, size).numpy()
    views = [centre, centre[:, ::-1]]
    h, w = image.shape[:2]
    rng = np.random.default_rng(int(hashlib.sha256(image_id.encode()).hexdigest()[:8], 16))
    while len(views) < count:
        side = max(1, round(min(h, w) * math.sqrt(rng.uniform(0.4, 1.0))))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = backbones.crop_resize(image[top: top + side, left: left + side], size).numpy()
        views += [crop, crop[:, ::-1]]
    return views[:count]


def encoder_spec(cfg: dict) -> dict:
    """What rebuilds the encoder exactly: saved with the run, since `predict --seed` must not
    change a randomly initialised encoder."""
    return {k: cfg[k] for k in ("backbone", "alpha", "weights", "image_size")} | {"init_seed": cfg["seed"] or 0}


def build_encoder(spec: dict):
    cfg = {**spec, "seed": spec["init_seed"]}
    base = backbones.build(cfg, deterministic_seed=spec["init_seed"])
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(base.output)
    return keras.Model(base.input, pooled, name="caption_encoder")


def _cache_dir(ctx: Context) -> Path:
    if ctx.cfg["cache_dir"]:
        return Path(str(ctx.cfg["cache_dir"])).expanduser()
    return ctx.run.dir.parent / ".embeddings"


def embeddings(ctx: Context, data: CaptionData, items: list[tuple[str, list[str]]], split: str = "",
               views: int = 1) -> np.ndarray:
    """Pooled encoder features of `views` crops of each of `items`' images (see `views_of`),
    shape (views, images, features): from the cache, or computed once and cached."""
    cfg = ctx.cfg
    spec = encoder_spec(cfg)
    ids = [i for i, _ in items]
    key_source = {"encoder": {**spec, "weights": backbones.weights_identity({**cfg, "seed": spec["init_seed"]})},
                  "dataset": f"{data.kind}:{data.source}:{split}", "images": ids, "views": views}
    key = hashlib.sha256(json.dumps(key_source, sort_keys=True).encode()).hexdigest()[:20]
    path = _cache_dir(ctx) / f"{cfg['backbone']}-{cfg['image_size']}-{key}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as cached:
            if cached["ids"].tolist() == ids and cached["embeddings"].shape[:2] == (views, len(ids)):
                ctx.reporter.info(f"image embeddings from the cache {path}")
                return cached["embeddings"]
    encoder = build_encoder(spec)
    what = f"{views} views of each of {len(ids)} images" if views > 1 else f"{len(ids)} images"
    ctx.reporter.info(f"computing {cfg['backbone']} embeddings of {what} (once; cached in {path.parent})")
    out, batch = [], []

    def encode_batch():
        crops = np.stack([view for image_views in batch for view in image_views])  # image-major
        features = encoder.predict(np.asarray(backbones.preprocess(cfg["backbone"], crops)), verbose=0)
        out.append(features.reshape(len(batch), views, -1).transpose(1, 0, 2))
        batch.clear()

    for image_id, image in _images(cfg, data, items, split):
        batch.append(views_of(image, image_id, cfg["image_size"], views))
        if len(batch) * views >= 32:
            encode_batch()
    if batch:
        encode_batch()
    vectors = np.concatenate(out, axis=1).astype(np.float32)
    atomic_write_npz(path, ids=np.array(ids), embeddings=vectors)
    return vectors


def heldout_embeddings(ctx: Context, data: CaptionData) -> np.ndarray:
    """The held-out images' embeddings (centre crops), shape (images, features)."""
    return embeddings(ctx, data, data.heldout, data.heldout_split)[0]


def caption_arrays(items, vocab: list[str], max_tokens: int):
    """One row per caption: (image embedding index, tokens)."""
    rows = [(i, c) for i, (_, caps) in enumerate(items) for c in caps]
    return np.array([i for i, _ in rows], np.int32), encode([c for _, c in rows], vocab, max_tokens)


def pipeline(vectors: np.ndarray, image_index: np.ndarray, tokens: np.ndarray):
    """(image embedding, words in) -> next words, weighted 0 on padding."""
    return tf.data.Dataset.from_tensor_slices((image_index, tokens)), shaper(vectors)


def shaper(vectors):
    """`pipeline`'s map from (image index, caption) to the model's example, traced once: a data
    set made each epoch with it traces no new function and copies no embeddings into a graph."""
    vectors = tf.convert_to_tensor(vectors)

    @tf.function
    def shape(i, t):
        target = t[1:]
        return (tf.gather(vectors, i), t[:-1]), target, tf.cast(target != PAD_ID, tf.float32)

    return shape


# -- model ---------------------------------------------------------------------------------


def build_model(cfg: dict, embed_dim: int, vocab_size: int, mean: np.ndarray, variance: np.ndarray):
    image = keras.Input((embed_dim,), name="image_embedding")
    words = keras.Input((None,), dtype="int32", name="words")
    x = keras.layers.Normalization(mean=mean.tolist(), variance=variance.tolist(), name="embedding_norm")(image)
    x = keras.layers.Dropout(cfg["dropout"], name="image_dropout")(x)
    x = keras.layers.Dense(cfg["bottleneck"], activation="elu", name="image_bottleneck")(x)
    state = keras.layers.Dense(cfg["lstm_units"], activation="elu", name="image_to_state")(x)
    embedded = keras.layers.Embedding(vocab_size, cfg["word_embedding"], name="word_embedding")(words)
    embedded = keras.layers.Dropout(cfg["dropout"], name="word_dropout")(embedded)
    seq, _, _ = keras.layers.LSTM(cfg["lstm_units"], return_sequences=True, return_state=True, name="lstm")(
        embedded, initial_state=[state, state])
    seq = keras.layers.Dropout(cfg["dropout"], name="lstm_dropout")(seq)
    hidden = keras.layers.Dense(cfg["logit_bottleneck"], activation="elu", name="logit_bottleneck")(seq)
    logits = keras.layers.Dense(vocab_size, name="logits")(hidden)
    model = keras.Model([image, words], logits, name="caption_lstm")
    model.compile(
        optimizer=keras.optimizers.Adam(cfg["lr"]),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight"),
        weighted_metrics=["accuracy"],
        jit_compile=cfg["jit_compile"],
    )
    return model


def start_model(model):
    """The decoder's start: an image embedding -> the LSTM's initial state (h, which is also c)."""
    image = keras.Input((model.get_layer("embedding_norm").input.shape[-1],), name="image_embedding")
    x = image
    for name in ("embedding_norm", "image_bottleneck", "image_to_state"):  # dropout is off at inference
        x = model.get_layer(name)(x)
    return keras.Model(image, x, name="caption_start")


def step_model(model):
    """One step of the decoder: (previous word ids (N,), h, c) -> (next-word log-probabilities
    (N, V), new h, new c), sharing the model's weights. Greedy, sampled and beam decoding drive
    it from NumPy, through Keras or as the exported step.tflite."""
    words = keras.Input((), dtype="int32", name="word")
    units = model.get_layer("lstm").cell.units
    h, c = keras.Input((units,), name="h"), keras.Input((units,), name="c")
    seq, (new_h, new_c) = model.get_layer("lstm").cell(model.get_layer("word_embedding")(words), [h, c])
    logits = model.get_layer("logits")(model.get_layer("logit_bottleneck")(seq))
    logp = keras.layers.Activation("log_softmax", name="log_probabilities")(logits)
    return keras.Model([words, h, c], [logp, new_h, new_c], name="caption_step")


class Decoder:
    """Greedy, sampled and beam decoding from NumPy over two models: `start` (image embeddings
    -> the LSTM's first state) and `step` (word ids, h, c -> log-probabilities, h, c), each an
    exported .tflite or the Keras models `start_model` and `step_model` pick (`of_model`)."""

    def __init__(self, start, step, vocab: list[str], max_tokens: int):
        self._start, self._step = start, step
        self.vocab, self.max_tokens = vocab, max_tokens
        self.banned = [PAD_ID, UNK_ID, START_ID]

    @classmethod
    def of_model(cls, model, vocab: list[str], max_tokens: int) -> "Decoder":
        from dlcli.inference.lite import KerasModel

        return cls(KerasModel(start_model(model)), KerasModel(step_model(model)), vocab, max_tokens)

    def start(self, vectors: np.ndarray):
        h = np.asarray(self._start(vectors.astype(np.float32)))
        return h, h

    def step(self, words: np.ndarray, state):
        logp, h, c = self._step(words.astype(np.int32), *state)
        logp = np.asarray(logp, np.float64)
        logp[:, self.banned] = -np.inf  # never generated: the rest renormalised
        logp -= logp.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))
        return logp, (h, c)

    def sample(self, vectors: np.ndarray, temperature: float, rng: np.random.Generator) -> list[list[str]]:
        """Draw each word from p ** (1/t) renormalised (the course's rule); t -> 0 is greedy."""
        state = self.start(vectors)
        words = np.full(len(vectors), START_ID)
        out = np.zeros((len(vectors), 0), int)
        for _ in range(self.max_tokens - 1):
            logp, state = self.step(words, state)
            scaled = np.exp((logp - logp.max(1, keepdims=True)) / temperature)
            probs = scaled / scaled.sum(1, keepdims=True)
            words = np.array([rng.choice(len(p), p=p) for p in probs])
            out = np.concatenate([out, words[:, None]], 1)
            if (out == END_ID).any(1).all():
                break
        return [decode_ids(row, self.vocab) for row in out]

    def beam(self, vectors: np.ndarray, width: int) -> list[list[str]]:
        """Beam search over all images at once (width 1 is greedy search)."""
        n, V = len(vectors), len(self.vocab)
        h, c = self.start(vectors)
        h, c = np.repeat(np.asarray(h), width, 0), np.repeat(np.asarray(c), width, 0)
        scores = np.full((n, width), -np.inf)
        scores[:, 0] = 0.0
        seqs = np.zeros((n, width, 0), int)
        done = np.zeros((n, width), bool)
        words = np.full(n * width, START_ID)
        for _ in range(self.max_tokens - 1):
            logp, (h, c) = self.step(words, (h, c))
            logp = logp.reshape(n, width, V)
            logp[done] = -np.inf
            logp[done, END_ID] = 0.0  # a finished caption carries its score unchanged
            total = (scores[:, :, None] + logp).reshape(n, width * V)
            top = np.argsort(-total, axis=1, kind="stable")[:, :width]
            beam, word = top // V, top % V
            rows = (np.arange(n)[:, None] * width + beam).reshape(-1)
            h, c = np.asarray(h)[rows], np.asarray(c)[rows]
            seqs = np.concatenate([np.take_along_axis(seqs, beam[:, :, None], 1), word[:, :, None]], 2)
            done = np.take_along_axis(done, beam, 1) | (word == END_ID)
            scores = np.take_along_axis(total, top, 1)
            words = word.reshape(-1)
            if done.all():
                break
        lengths = np.where(seqs == END_ID, np.arange(seqs.shape[2]), seqs.shape[2]).min(2) + 1
        ranked = np.where(np.isfinite(scores), scores / lengths ** LENGTH_ALPHA, -np.inf)
        best = ranked.argmax(1)
        return [decode_ids(seqs[i, best[i]], self.vocab) for i in range(n)]


# -- train / evaluate ----------------------------------------------------------------------


def _vocab(ctx: Context) -> list[str]:
    return ctx.run.read_names("vocab.json", "words")


def train(ctx: Context) -> dict:
    cfg = ctx.cfg
    training.set_seed(cfg["seed"])
    backbones.check_size(cfg)
    backbones.resolve_weights(cfg)  # the weights error before any data work
    data = load_data(cfg)
    vocab = build_vocab([c for _, caps in data.train for c in caps], cfg["min_word_count"])
    atomic_write_json(ctx.run.file("vocab.json"), vocab)
    atomic_write_json(ctx.run.file("encoder.json"), encoder_spec(cfg))
    train_views = embeddings(ctx, data, data.train, data.train_split, views=cfg["train_views"])
    held_vectors = heldout_embeddings(ctx, data)
    index, tokens = caption_arrays(data.train, vocab, cfg["max_caption_tokens"])
    held_index, held_tokens = caption_arrays(data.heldout, vocab, cfg["max_caption_tokens"])
    ctx.reporter.info(f"{len(data.train)} training images ({len(tokens)} captions), {len(data.heldout)} held out; "
                      f"vocabulary {len(vocab)} words")
    held_ds, held_shape = pipeline(held_vectors, held_index, held_tokens)
    val = held_ds.map(held_shape).batch(256).cache()
    n_views, n_images, width = train_views.shape
    shape = shaper(train_views.reshape(n_views * n_images, width))

    def train_data(epoch):
        """Each caption with one view of its image, drawn from (seed, epoch)."""
        seed = training.epoch_seed(cfg["seed"], epoch)
        view = np.random.default_rng(seed).integers(0, n_views, len(index))
        ds = tf.data.Dataset.from_tensor_slices((view * n_images + index, tokens))
        return ds.shuffle(len(tokens), seed=seed).map(shape).batch(cfg["batch_size"]).prefetch(tf.data.AUTOTUNE)

    mean, var = train_views[0].mean(0), train_views[0].var(0) + 1e-6
    model, history = training.fit(
        ctx, lambda: build_model(cfg, width, len(vocab), mean, var), train_data, val,
        steps_per_epoch=-(-len(tokens) // cfg["batch_size"]),
        callbacks=[schedules.cosine_per_epoch(cfg["lr"], first=0, length=cfg["epochs"])])
    final = history[-1]
    return {"val_loss": final["val_loss"], "val_next_word_accuracy": final["val_accuracy"],
            "train_images": len(data.train), "heldout_images": len(data.heldout), "vocabulary": len(vocab)}


def baseline_caption(items) -> list[str]:
    """The trivial baseline: the most common training caption (as tokens), for every image."""
    counts = Counter(" ".join(tokenize(c)) for _, caps in items for c in caps)
    return counts.most_common(1)[0][0].split()


def bigram_accuracy(train_tokens: np.ndarray, held_tokens: np.ndarray) -> float:
    """Next-word accuracy of 'the most common word after the previous one' in training captions."""
    following: dict[int, Counter] = defaultdict(Counter)
    for row in train_tokens:
        for a, b in zip(row[:-1], row[1:]):
            if b != PAD_ID:
                following[a][b] += 1
    best = {a: c.most_common(1)[0][0] for a, c in following.items()}
    prev, nxt = held_tokens[:, :-1].ravel(), held_tokens[:, 1:].ravel()
    real = nxt != PAD_ID
    guesses = np.array([best.get(int(a), UNK_ID) for a in prev[real]])
    return float(np.mean(guesses == nxt[real]))


def evaluate(ctx: Context) -> dict:
    cfg = ctx.cfg
    model = training.load_model(ctx.model_path, "caption")
    vocab = _vocab(ctx)
    other = ctx.on_other_data
    data = load_data(cfg, hold_out_all=other)
    if other:
        ctx.reporter.info(f"evaluating all {len(data.heldout)} images of {cfg['dataset']} (not the run's training data)")
    held_vectors = heldout_embeddings(ctx, data)
    held_index, held_tokens = caption_arrays(data.heldout, vocab, cfg["max_caption_tokens"])
    held_ds, shape = pipeline(held_vectors, held_index, held_tokens)
    loss, accuracy = model.evaluate(held_ds.map(shape).batch(256), verbose=0)
    references = [[tokenize(c) for c in caps] for _, caps in data.heldout]
    decoder = Decoder.of_model(model, vocab, cfg["max_caption_tokens"])
    metrics = {"heldout_images": len(data.heldout), "next_word_accuracy": float(accuracy), "loss": float(loss)}
    widths = [1] + ([cfg["eval_beam"]] if cfg["eval_beam"] > 1 else [])
    for width in widths:
        hyps = [w for s in range(0, len(held_vectors), 256) for w in decoder.beam(held_vectors[s: s + 256], width)]
        prefix = "greedy" if width == 1 else f"beam{width}"
        metrics.update({f"{prefix}_bleu_{n}": round(b, 4) for n, b in enumerate(corpus_bleu(references, hyps), 1)})
    train_items = _training_items(ctx) if other else data.train
    if not train_items:
        return metrics
    baseline = baseline_caption(train_items)
    metrics.update({f"baseline_bleu_{n}": round(b, 4) for n, b in
                    enumerate(corpus_bleu(references, [baseline] * len(references)), 1)})
    _, train_tokens = caption_arrays(train_items, vocab, cfg["max_caption_tokens"])
    metrics["baseline_next_word_accuracy"] = bigram_accuracy(train_tokens, held_tokens)
    metrics["baseline_caption"] = " ".join(baseline)
    return metrics


def _training_items(ctx: Context) -> list:
    """The run's own training captions (the baselines are fitted on them), or [] where that
    data is no longer there."""
    trained = ctx.run.read_config()
    try:
        return load_data({**ctx.cfg, "dataset": trained["dataset"], "data_dir": trained.get("data_dir")}).train
    except UsageError:
        ctx.reporter.info(f"the run's training data {trained['dataset']} is gone: no baselines")
        return []


# -- predict -------------------------------------------------------------------------------


def _decode(ctx: Context, decoder: Decoder, vectors: np.ndarray) -> list[list[str]]:
    beam, temperature = ctx.options.get("beam", 1), ctx.options.get("temperature", 0.0)
    if beam < 1 or temperature < 0:
        raise UsageError("--beam must be >= 1 and --temperature >= 0")
    if temperature > 0:
        if beam > 1:
            raise UsageError("use --beam or --temperature, not both")
        return decoder.sample(vectors, temperature, np.random.default_rng(ctx.cfg["seed"]))
    return decoder.beam(vectors, beam)


def run_encoder_spec(ctx: Context) -> dict:
    """The encoder the run was trained with (its encoder.json), else the one its config builds."""
    spec_path = ctx.run.file("encoder.json")
    spec = ctx.run.read_json("encoder.json") if spec_path.exists() else encoder_spec(ctx.cfg)
    if not isinstance(spec, dict) or not isinstance(spec.get("backbone"), str) or not isinstance(spec.get("image_size"), int):
        raise UsageError(f"{spec_path} is not an encoder description (backbone, image_size)")
    return spec


def prepare(spec: dict, images: list[np.ndarray]) -> np.ndarray:
    """Photos -> the encoder's input batch, in NumPy and Pillow (no TensorFlow): the centred
    square, resized (antialiased bilinear), scaled as the backbone's weights expect."""
    crops = np.stack([backbones.centre_crop_numpy(image, spec["image_size"]) for image in images])
    return backbones.preprocess_numpy(backbones.NUMPY_MODES[spec["backbone"]], crops)


def predict(ctx: Context, inputs: list[str]) -> list[dict]:
    if not inputs:
        raise UsageError("give image files to caption: `dlcli predict caption photo.jpg [more.jpg ...]`")
    vocab = _vocab(ctx)
    spec = run_encoder_spec(ctx)
    good, images, failures = read_many(inputs, lambda p: read_image(p, mode="RGB"))
    rows = []
    if images:
        models = lite.models_for(ctx, "caption")  # the exported encoder, start and step where current, else Keras
        vectors = np.concatenate([models["encoder"](prepare(spec, images[s: s + 32])) for s in range(0, len(images), 32)])
        decoder = Decoder(models["start"], models["step"], vocab, ctx.cfg["max_caption_tokens"])
        captions = _decode(ctx, decoder, vectors)
        rows = [{"input": p, "caption": " ".join(c), "text": " ".join(c)} for p, c in zip(good, captions)]
    return in_input_order(inputs, rows + failures)


def export_preprocessing(cfg: dict) -> dict:
    """How a user of the exported encoder, start and step captions a photo (export.json)."""
    size, mode = cfg["image_size"], backbones.NUMPY_MODES[cfg["backbone"]]
    return {"input": "RGB photo of any size", "steps": [
        "the centred square", f"resize to {size}x{size} (bilinear, antialiased)", f"{mode} scaling (see mode)",
        "encoder.tflite: the image embedding", "start.tflite: the LSTM's first state h (c = h)",
        "step.tflite from #START#: word id, h, c -> log-probabilities of the next word, h, c; until #END#"],
        "code": "dlcli.tasks.caption.prepare + Decoder", "shape": [size, size, 3], "mode": mode,
        "vocabulary": "vocab.json", "never_generated": SPECIALS[:3], "start": START_ID, "end": END_ID,
        "max_tokens": cfg["max_caption_tokens"]}


EXPORT = ExportSpec(
    preprocessing=export_preprocessing,
    models={"encoder": lambda model, ctx: build_encoder(run_encoder_spec(ctx)),
            "start": lambda model, ctx: start_model(model),
            "step": lambda model, ctx: step_model(model)},
    output="encoder: image embeddings; start: the LSTM's first state; step: next-word log-probabilities and state",
    files=("vocab.json", "encoder.json"))


# -- views ---------------------------------------------------------------------------------


def view_samples(ctx: Context) -> Path:
    """Held-out images with the generated caption (bold) above two of their references."""
    from dlcli.plots import pyplot, save_figure

    cfg = ctx.cfg
    model = training.load_model(ctx.model_path, "caption")
    vocab = _vocab(ctx)
    data = load_data(cfg)
    held_vectors = heldout_embeddings(ctx, data)
    n = min(ctx.options["n"], len(data.heldout))
    captions = _decode(ctx, Decoder.of_model(model, vocab, cfg["max_caption_tokens"]), held_vectors[:n])
    crops = [backbones.crop_resize(image, 224).numpy()
             for _, image in _images(cfg, data, data.heldout[:n], data.heldout_split)]
    plt = pyplot()
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 3.4, rows * 4.3), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(crops[i])
        refs = "\n".join(textwrap.fill("- " + r, 44) for r in data.heldout[i][1][:2])
        ax.set_title(textwrap.fill(" ".join(captions[i]) or "(empty)", 40), fontsize=8, fontweight="bold")
        ax.text(0, 1.0, refs, transform=ax.transAxes, fontsize=6.5, va="top", ha="left", color="dimgray",
                bbox={"facecolor": "white", "alpha": 0.75, "edgecolor": "none"})
    how = f"beam {ctx.options['beam']}" if ctx.options["beam"] > 1 else "greedy"
    fig.suptitle(f"caption / {ctx.run.name}: held-out images, generated ({how}) and reference captions")
    return save_figure(fig, ctx.view_path("caption-samples"))


DECODE_OPTIONS = {
    "beam": Option(int, 1, "beam width (1: greedy search)"),
    "temperature": Option(float, 0.0, "sample words with this temperature instead (0: off)"),
}

# What this task's own config keys mean (and its own meaning of shared ones), for
# `dlcli tasks TASK` and `train --help`; keys every task shares are in `config.KEY_HELP`.
KEY_HELP = {
    "holdout": "the share of a captions:DIR data set's images held out for evaluation",
    "max_images": "use only the first N images (0: all)",
    "cache_dir": "where image embeddings are cached (default: <runs-dir>/caption/.embeddings)",
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
}


TASK = TaskSpec(
    name="caption",
    summary="caption images: a pretrained CNN encoder (cached embeddings) and an LSTM decoder",
    defaults=DEFAULTS,
    data=DataRules(kinds=("tfds", "captions")),
    choices=CHOICES,
    train=train,
    evaluate=evaluate,
    predict=predict,
    predict_options=DECODE_OPTIONS,
    views={
        "caption-samples": View(view_samples, "held-out images with generated and reference captions",
                                options={"n": Option(int, 8, "how many images"), **DECODE_OPTIONS}),
    },
    key_help=KEY_HELP,
    inputs=FileInputs(),
    export=EXPORT,
)
