"""One worker of a MultiWorkerMirroredStrategy cluster.

    python tests/programs/multiworker_job.py OUT KIND

Run by `scripts/launch_workers.py` (which sets `TF_CONFIG`) from
`tests/test_multiworker.py`. Builds the model `KIND` ("engine",
"classifier" or "gan") from `multiworker_common.py`, fits two epochs on
its data, evaluates, and writes `OUT/weights{INDEX}.npz` and
`OUT/logs{INDEX}.json` (history and evaluation), `INDEX` being the
worker's task index.
"""

import json
import os
import sys

import keras  # noqa: F401
import numpy as np
import tensorflow as tf

import fitcustom  # noqa: F401

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from multiworker_common import data  # noqa: E402
from multiworker_common import make_model  # noqa: E402

out, kind = sys.argv[1], sys.argv[2]
strategy = tf.distribute.MultiWorkerMirroredStrategy()
index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
x, y = data()
options = tf.data.Options()
options.experimental_distribute.auto_shard_policy = (
    tf.data.experimental.AutoShardPolicy.DATA
)
elements = (x, y) if kind != "gan" else x
ds = tf.data.Dataset.from_tensor_slices(elements).batch(16)
ds = ds.with_options(options)
with strategy.scope():
    model = make_model(kind)
history = model.fit(ds, epochs=2, verbose=0).history
evaluation = model.evaluate(ds, verbose=0, return_dict=True)
np.savez(os.path.join(out, f"weights{index}.npz"), *model.get_weights())
with open(os.path.join(out, f"logs{index}.json"), "w") as f:
    json.dump({"history": history, "evaluate": evaluation}, f)
