"""Saves, loads and continues a TapeGAN in fresh processes.

    python tests/programs/gan_resume.py TESTS MODE PATH OUT

`TESTS` is the `tests/` folder (to import `test_gan`). `MODE` "save": one
epoch, then save to `PATH`. "continue": load the GAN saved at `PATH`, one
more epoch. "uninterrupted": two epochs, no saving. The last two write
the weights, both optimizers' iterations, samples and logs to `OUT` (an
`.npz`), which `tests/test_gan.py` compares. Grappler is off (see there).
"""

import sys

sys.path.insert(0, sys.argv[1])
import keras
import numpy as np
import tensorflow as tf

import fitcustom

tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
from test_gan import real_images  # noqa: E402
from test_gan import resumable_gan  # noqa: E402

mode, path, out = sys.argv[2:5]
images = real_images(64)
if mode == "continue":
    gan = keras.models.load_model(path, safe_mode=True)
    assert isinstance(gan, fitcustom.TapeGAN), type(gan)
else:
    gan = resumable_gan()
    gan.fit(images, batch_size=16, epochs=1, shuffle=False, verbose=0)
if mode == "save":
    gan.save(path)
    sys.exit(0)
logs = gan.fit(
    images, batch_size=16, epochs=1, shuffle=False, verbose=0
).history
np.savez(
    out,
    *gan.get_weights(),
    d_iterations=gan.d_optimizer.iterations.numpy(),
    g_iterations=gan.g_optimizer.iterations.numpy(),
    samples=gan.generate(4, seed=2),
    logs=[logs[k][0] for k in sorted(logs)],
)
