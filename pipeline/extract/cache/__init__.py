"""The one owner of the HDF5 embedding cache: its key (``key``), how it is written (``writer``: append,
resume point, finish, atomic rename), and how it is read (``reader``: whole into memory; ``stream``: in
chunk-aligned row ranges). Nothing outside this package opens a cache with h5py.

Layout: one group per split (and ``views`` for augmented training views), each with ``embeddings``
(N x D float32), ``labels``, ``ids``, ``skipped`` and, with taps, ``taps/<layer>`` (N x width float32);
the file's attributes hold the key, ``tap_layers``, ``extract_seconds``, ``runtime`` and ``complete``.
"""
