"""ds_autofreeze: AutoFreeze (arXiv 2102.01386) on DeepSpeed.

``ds_autofreeze.attach(engine, config)`` adds AutoFreeze to an engine ``deepspeed.initialize`` built
(configured by the ``"autofreeze"`` section of the DeepSpeed JSON): it freezes a growing prefix of
the model's blocks, removes them from the optimizer and the gradient traffic, and serves their
output from the activation cache. ``ds_autofreeze.initialize`` is ``deepspeed.initialize`` + attach.
"""
from .autofreeze import AutoFreeze, attach, initialize
from .config import AutoFreezeConfig, ConfigError, get_autofreeze_config
from .deciders import DECIDERS, Decider, build_decider
from .model_adapter import SUPPORTED_MODEL_TYPES, ModelAdapter, UnsupportedModelError

__all__ = ["AutoFreeze", "AutoFreezeConfig", "ConfigError", "DECIDERS", "Decider", "ModelAdapter",
           "SUPPORTED_MODEL_TYPES", "UnsupportedModelError", "attach", "build_decider", "get_autofreeze_config",
           "initialize"]
