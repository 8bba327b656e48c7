"""`TapeModel.compile()` and the compile configuration that is saved
with a model (a mixin of `TapeModel`).

May import: the ground floor, `_keras`, `engine.transforms`.
"""

import keras

from fitcustom import _args
from fitcustom._engine_state import engine_state
from fitcustom._keras import compat as _compat
from fitcustom.engine import transforms as transforms_lib


class CompileMixin:
    """`compile()`, the engine's compile options, and the compile
    arguments kept with a model (part of `fitcustom.TapeModel`)."""

    def compile(
        self,
        optimizer="rmsprop",
        loss=None,
        loss_weights=None,
        metrics=None,
        weighted_metrics=None,
        run_eagerly=False,
        steps_per_execution=1,
        jit_compile="auto",
        auto_scale_loss=True,
        *,
        gradient_transforms=None,
        log_gradient_norm=False,
        skip_nonfinite=False,
    ):
        """Configures the model for training.

        Takes the arguments of `keras.Model.compile`, in Keras' order and
        with Keras' defaults, plus the engine's options (keyword only).

        Args:
            optimizer: As in `keras.Model.compile`. Defaults to `"rmsprop"`.
            loss: As in `keras.Model.compile`: one loss, or a list or dict
                with one per output.
            loss_weights: As in `keras.Model.compile`.
            metrics: As in `keras.Model.compile`.
            weighted_metrics: As in `keras.Model.compile`.
            run_eagerly: As in `keras.Model.compile`. Defaults to `False`.
            steps_per_execution: As in `keras.Model.compile`. Defaults
                to `1`.
            jit_compile: As in `keras.Model.compile`. Defaults to `"auto"`.
            auto_scale_loss: As in `keras.Model.compile`. Defaults to
                `True`.
            gradient_transforms: List of `fitcustom.GradientTransform`
                applied in order to the unscaled gradients. Defaults to
                `None` (none).
            log_gradient_norm: Log `gradient_norm`, the epoch mean of the
                global norm of the (replica-summed, unscaled) gradients
                before the transforms. Defaults to `False`.
            skip_nonfinite: Skip steps whose loss or gradients are not
                finite and count them in the `nonfinite_steps` metric.
                Defaults to `False`.
        """
        _args.boolean("log_gradient_norm", log_gradient_norm)
        _args.boolean("skip_nonfinite", skip_nonfinite)
        steps_per_execution = _args.whole(
            "steps_per_execution",
            steps_per_execution,
            hint=" It is the number of steps run per call of the compiled "
            "step.",
        )
        gradient_transforms = transforms_lib.validate_transforms(
            gradient_transforms
        )
        self._check_output_keys(metrics, "metrics")
        self._check_output_keys(weighted_metrics, "weighted_metrics")
        named = {}
        if isinstance(optimizer, dict):
            named = self._resolve_named_optimizers(optimizer, auto_scale_loss)
            optimizer = None
        super().compile(
            optimizer=optimizer,
            loss=loss,
            loss_weights=loss_weights,
            metrics=metrics,
            weighted_metrics=weighted_metrics,
            run_eagerly=run_eagerly,
            steps_per_execution=steps_per_execution,
            jit_compile=jit_compile,
            auto_scale_loss=auto_scale_loss,
        )
        # Not tracked by Keras (a metric object in it would be counted as
        # one of the model's own metrics too).
        engine_state(self).compiled_by_name = (
            loss,
            (metrics, weighted_metrics),
        )
        self._gradient_transforms = gradient_transforms
        self._log_gradient_norm = log_gradient_norm
        self._skip_nonfinite = skip_nonfinite
        engine_state(self).named_optimizers = named
        # Saved at `_named_optimizers/NAME`, whatever the dict's order.
        self._named_optimizers = _compat.saveable_group(named)
        if self.optimizer is not None:
            self.check_transforms(self.optimizer)
        self.check_transforms(*named.values())
        self.keep_compile_arguments(
            gradient_transforms=list(gradient_transforms),
            log_gradient_norm=log_gradient_norm,
            skip_nonfinite=skip_nonfinite,
        )
        if named:
            self.keep_compile_arguments(optimizer=dict(named))
            # On the weights of the sub-models they train, where those
            # exist already (a loaded model then gets its state back).
            self._build_named_optimizers()

    def _check_output_keys(self, value, argument):
        """Refuses a dict of metrics naming an output the model does not
        have (Keras accepts it and logs nothing for it)."""
        if not isinstance(value, dict):
            return
        outputs = getattr(self, "output_names", None)
        if not outputs:
            return  # a subclassed model names its outputs once called
        unknown = sorted(set(value) - set(outputs))
        if unknown:
            raise ValueError(
                f"compile({argument}=...) names outputs that "
                f"{type(self).__name__} does not have: {unknown}. Received "
                f"keys {sorted(value)}; the model's outputs are "
                f"{list(outputs)}. Use those names (the `name=` of the "
                "output layers)."
            )

    def _resolve_named_optimizers(self, optimizers, auto_scale_loss):
        """`{name: optimizer}` from `compile(optimizer={...})`: each
        resolved from a name or instance, and wrapped for loss scaling
        under `mixed_float16` (as Keras wraps `optimizer`)."""
        if not optimizers:
            raise ValueError(
                "compile(optimizer={...}) needs at least one optimizer. "
                "Received: an empty dict. Pass e.g. optimizer={'generator': "
                "'adam', 'discriminator': 'adam'}, or one optimizer."
            )
        named = {}
        for name, optimizer in optimizers.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(
                    "An optimizer's name must be an identifier such as "
                    f"'generator'. Received: {name!r}."
                )
            if optimizer is None:
                raise ValueError(
                    f"The optimizer {name!r} is None. Received: "
                    f"optimizer={{{name!r}: None}}. Pass a name such as "
                    "'adam' or a keras.optimizers.Optimizer."
                )
            optimizer = keras.optimizers.get(optimizer)
            if (
                auto_scale_loss
                and self.dtype_policy.name == "mixed_float16"
                and not isinstance(
                    optimizer, keras.optimizers.LossScaleOptimizer
                )
            ):
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            named[name] = optimizer
        seen = {}
        for name, optimizer in named.items():
            if id(optimizer) in seen:
                raise ValueError(
                    "Each named optimizer must be an optimizer object of "
                    "its own (each keeps its own state). Received: the same "
                    f"object for {seen[id(optimizer)]!r} and {name!r}."
                )
            seen[id(optimizer)] = name
        return named

    @property
    def gradient_transforms(self):
        """The compiled gradient transforms (a tuple)."""
        return self._gradient_transforms

    @property
    def skip_nonfinite(self) -> bool:
        """Whether steps with a non-finite loss or gradient are skipped
        (the compiled `skip_nonfinite`)."""
        return self._skip_nonfinite

    @property
    def log_gradient_norm(self) -> bool:
        """Whether `gradient_norm` is logged (the compiled option)."""
        return self._log_gradient_norm

    def check_transforms(self, *optimizers):
        """Lets each gradient transform warn about an optimizer it cannot
        work with (`GradientTransform.check_optimizer`). `compile()`
        calls it with the model's optimizer; a model with optimizers of
        its own (`TapeGAN`) calls it with them."""
        for optimizer in optimizers:
            inner = getattr(optimizer, "inner_optimizer", optimizer)
            for transform in self._gradient_transforms:
                transform.check_optimizer(inner)

    def keep_compile_arguments(self, **arguments):
        """Saves `compile()` arguments with the model.

        A subclass whose `compile()` takes arguments of its own calls it
        with them (as the user passed them: `None` for a default that
        `compile()` fills in). `get_compile_config` writes them beside
        Keras' own (replacing an entry of the same name), and loading a
        saved model passes them back to `compile()`; Keras objects
        (optimizers, losses, gradient transforms) are serialized. So a
        task model needs no `get_compile_config` / `compile_from_config`
        of its own.

        Args:
            **arguments: `compile()`'s arguments by name.
        """
        # Not tracked by Keras (a metric object in it would be counted as
        # one of the model's own metrics too).
        engine_state(self).kept_compile_arguments.update(arguments)

    def _forget_compile_argument(self, name):
        """Drops a kept argument that a subclass keeps in its own words
        (TapeGAN keeps its optimizers as `d_optimizer` / `g_optimizer`,
        not as `optimizer={...}`: its saved files keep their layout)."""
        engine_state(self).kept_compile_arguments.pop(name, None)

    @property
    def compile_arguments(self):
        """The `compile()` arguments kept with the model (a new dict)."""
        return dict(engine_state(self).kept_compile_arguments)

    def get_compile_config(self):
        config = super().get_compile_config()
        kept = engine_state(self).kept_compile_arguments
        if config and kept:
            config.update(keras.saving.serialize_keras_object(kept))
        return config

    def compile_from_config(self, config):
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        self._build_from_sublayers()
        if self.optimizer is not None and self.built:
            self.optimizer.build(self.trainable_variables)
