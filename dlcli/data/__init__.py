"""Reading data: the `--dataset` sources (tensorflow-datasets, folder:, npz:, text:, captions:)
and their fast offline check (`sources`), safe image decoding (`images`), face photos (`faces`)."""
