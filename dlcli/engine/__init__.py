"""The training engine every Keras task shares: the training loop (`training`), seeding,
precision, learning-rate schedules, the TF_CONFIG cluster, signals, rich progress, the
standard streams (`streams`: stdout that fails in one line, text safe for a terminal), lazy
imports, and every use of a private Keras or TensorFlow API (`keras_workarounds`)."""
