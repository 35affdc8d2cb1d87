"""`make extract`, and everything it needs to run a frozen backbone over images once: ``stage`` (the stage:
plan, reuse or resume the cache, write it), ``engines`` (how the forward pass runs: local or Ray Data),
``runtimes`` (TensorFlow or ONNX Runtime, the conversion cached), ``cache`` (the one owner of the HDF5
embedding cache that every later stage reads)."""
