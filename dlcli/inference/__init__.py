"""Using a trained model: predict's inputs (files, folders, globs, stdin; `inputs`), the
TensorFlow-free LiteRT path (`lite`) and the export that feeds it (`export`)."""
