"""minipeft: a small, exact, readable reference implementation of parameter-efficient fine-tuning."""
from .adapters.lora import LoRAConfig
from .autograd import Tensor, no_grad
from .backend import get_backend, set_backend
from .errors import BackendError, CheckpointError, ConfigError, MiniPeftError, TrainingError
from .model import Model, load_model

__version__ = "0.1.0"
__all__ = ["load_model", "Model", "LoRAConfig", "Tensor", "no_grad", "set_backend", "get_backend",
           "MiniPeftError", "ConfigError", "CheckpointError", "BackendError", "TrainingError"]
