"""ds_autofreeze: AutoFreeze (arXiv 2102.01386) on DeepSpeed.

``ds_autofreeze.initialize`` mirrors ``deepspeed.initialize`` and returns an ``AutoFreezeEngine``
that freezes a growing prefix of the model's blocks, configured by the ``"autofreeze"`` section
of the DeepSpeed JSON.
"""
from .config import AutoFreezeConfig, ConfigError, get_autofreeze_config
from .deciders import DECIDERS, Decider, build_decider
from .engine import AutoFreezeEngine, initialize
from .model_adapter import SUPPORTED_MODEL_TYPES, ModelAdapter, UnsupportedModelError

__all__ = ["AutoFreezeConfig", "AutoFreezeEngine", "ConfigError", "DECIDERS", "Decider", "ModelAdapter",
           "SUPPORTED_MODEL_TYPES", "UnsupportedModelError", "build_decider", "get_autofreeze_config", "initialize"]
