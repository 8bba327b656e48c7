"""fitcustom: custom GradientTape training steps that keep `fit()`.

The public API is what this module exports. The package's layout:

- `engine/`: `TapeModel`, the step engine (one mixin per concern);
- `tasks/`: the task models on it (`classifier`, `distiller`, `gan/`);
- `_keras/`: the only place that touches Keras internals;
- `checkpoints` (with `preemption` and `callback_states`), `datasets`,
  `architectures`, `testing`;
- the ground floor, importing nothing else of fitcustom's but `_keras`:
  `_args`, `checks`, `distribute`, `networks`, `_version`.

May import: every module (it exports the public names).
"""

from fitcustom import architectures as architectures
from fitcustom import checkpoints as checkpoints
from fitcustom import checks as checks
from fitcustom import distribute as distribute
from fitcustom import testing as testing
from fitcustom._version import __version__ as __version__
from fitcustom.checkpoints import BackupAndRestore as BackupAndRestore
from fitcustom.checkpoints import ModelCheckpoint as ModelCheckpoint
from fitcustom.checkpoints import load_model as load_model
from fitcustom.engine import TapeModel as TapeModel
from fitcustom.engine.transforms import ClipByGlobalNorm as ClipByGlobalNorm
from fitcustom.engine.transforms import GradientTransform as GradientTransform
from fitcustom.engine.transforms import ScaleByLayer as ScaleByLayer
from fitcustom.tasks.classifier import ClassifierLoss as ClassifierLoss
from fitcustom.tasks.classifier import TapeClassifier as TapeClassifier
from fitcustom.tasks.distiller import TapeDistiller as TapeDistiller
from fitcustom.tasks.gan import evaluation as evaluation
from fitcustom.tasks.gan import losses as gan_losses
from fitcustom.tasks.gan import quality as quality
from fitcustom.tasks.gan.callbacks import SampleGrid as SampleGrid
from fitcustom.tasks.gan.model import TapeGAN as TapeGAN
from fitcustom.tasks.gan.quality import GANQuality as GANQuality

__all__ = [
    "BackupAndRestore",
    "ClassifierLoss",
    "ClipByGlobalNorm",
    "GANQuality",
    "GradientTransform",
    "ModelCheckpoint",
    "SampleGrid",
    "ScaleByLayer",
    "TapeClassifier",
    "TapeDistiller",
    "TapeGAN",
    "TapeModel",
    "architectures",
    "checkpoints",
    "checks",
    "distribute",
    "evaluation",
    "gan_losses",
    "load_model",
    "quality",
    "testing",
]
