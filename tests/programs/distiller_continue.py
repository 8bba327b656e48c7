"""Loads a saved TapeDistiller in a fresh process, trains one more epoch.

    python tests/programs/distiller_continue.py MODEL OUT

Loads `MODEL` (a `.keras` file), fits one epoch on the same data as
`tests/test_distiller.py` and saves the weights to `OUT` (a
`.weights.h5` file).
"""

import sys

import keras
import numpy as np

import fitcustom

path, out = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
x = rng.normal(size=(48, 6)).astype("float32")
y = (x[:, 0] > 0).astype("int32") + (x[:, 1] > 0).astype("int32")
distiller = keras.saving.load_model(path)
assert isinstance(distiller, fitcustom.TapeDistiller)
distiller.fit(x, y, batch_size=12, epochs=1, shuffle=False, verbose=0)
distiller.save_weights(out)
