"""EMA copies of networks (a mixin of `TapeModel`): `track_ema` makes a
copy of a sub-model whose weights follow an exponential moving average of
the network's, and `follow_emas` moves the copies after an applied update
(`minimize` calls it; a step that updates with `update()` calls it).

May import: the ground floor, `_keras`.
"""

import dataclasses

import keras
import tensorflow as tf

from fitcustom import _args
from fitcustom import distribute
from fitcustom._engine_state import engine_state
from fitcustom._keras import compat as _compat


@dataclasses.dataclass(frozen=True)
class _EMA:
    source: keras.Layer
    copy: keras.Layer
    decay: float
    optimizer: str | None


class EMANetworks:
    """EMA copies of sub-models (part of `fitcustom.TapeModel`)."""

    def track_ema(
        self, network, decay: float, optimizer: str | None = None
    ) -> keras.Model:
        """A copy of `network` whose weights follow an exponential moving
        average of `network`'s, updated after each applied update of
        `optimizer`: `ema = decay * ema + (1 - decay) * weights` (the
        first applied update copies the weights). The same on every
        replica, left alone by a step the guard skipped, saved with the
        model and restored by `BackupAndRestore`. Call it in `__init__`,
        after assigning `network`, and keep the copy as an attribute:
        `self.ema_network = self.track_ema(self.network, 0.999)`.

        Args:
            network: A functional or `Sequential` sub-model of this model
                (a `Sequential` without `keras.Input` gets its copy built
                with it, by the first batch).
            decay: In (0, 1), e.g. 0.999.
            optimizer: The name of the optimizer that trains `network`
                (`None`: the model's own).

        Returns:
            The EMA copy (not trainable).
        """
        decay = _args.number(
            "decay", decay, low=0, high=1, low_open=True, high_open=True
        )
        if not isinstance(network, keras.Layer) or not any(
            layer is network for layer in _compat.sublayers(self)
        ):
            raise ValueError(
                "track_ema() copies a sub-model of this model. Received: "
                f"{network!r}, which is not one of its layers. Assign it "
                "first (self.network = network), then call "
                "self.track_ema(self.network, decay)."
            )
        try:
            copy = keras.models.clone_model(network)
        except ValueError as e:
            raise ValueError(
                "track_ema() needs a network that keras.models.clone_model "
                "can copy (functional or Sequential). Received: "
                f"{type(network).__name__}: {e}"
            ) from e
        if network.built and copy.built:
            copy.set_weights(network.get_weights())
        copy.trainable = False
        emas = engine_state(self).emas
        emas.append(_EMA(network, copy, decay, optimizer))
        # Tracked (and saved) even if the caller keeps no attribute.
        setattr(self, f"_ema_copy_{len(emas) - 1}", copy)
        return copy

    def follow_emas(self, optimizer: str | None = None, finite=None):
        """Moves the EMA copies tied to `optimizer` (see `track_ema`)
        towards their networks. `minimize` calls it after its update; a
        step that updates with `update()` calls it after that.

        Args:
            optimizer: The optimizer's name (`None`: the model's own).
            finite: The guard's verdict of the update (`None`: applied);
                a skipped update leaves the copies as they are.
        """
        emas = engine_state(self).emas
        emas = [e for e in emas if e.optimizer == optimizer]
        if not emas:
            return
        opt = self.get_optimizer(optimizer)
        for ema in emas:
            self._update_ema(ema, opt, finite)

    def _build_emas(self):
        """Builds the EMA copies of sub-models that were not built when
        `track_ema` copied them (a `Sequential` without `keras.Input`,
        built by the first batch), with the network's weights."""
        for ema in engine_state(self).emas:
            if ema.copy.built or not ema.source.built:
                continue
            config = ema.source.get_build_config()
            if config:
                ema.copy.build_from_config(config)
            if ema.copy.built:
                ema.copy.set_weights(ema.source.get_weights())

    def _update_ema(self, ema, optimizer, finite):
        if len(ema.copy.weights) != len(ema.source.weights):
            raise ValueError(
                f"The EMA copy of {ema.source.name!r} has "
                f"{len(ema.copy.weights)} weights and the network "
                f"{len(ema.source.weights)}: it was not built. Received: a "
                "network that was built after track_ema() without an "
                "input shape. Create it with keras.Input, or build it "
                "before calling track_ema()."
            )
        first = optimizer.iterations <= 1
        rate = tf.where(first, 1.0, 1.0 - ema.decay)
        if finite is not None:
            rate = tf.where(finite, rate, 0.0)
        deltas = [
            tf.cast(rate, w.dtype) * (w - e)
            for w, e in zip(ema.source.weights, ema.copy.weights)
        ]
        distribute.assign_add_everywhere(ema.copy.weights, deltas)
