"""minipeft: a small, exact, readable reference implementation of parameter-efficient fine-tuning."""
from .adapters.adalora import AdaLoRAConfig
from .adapters.loha import LoHaConfig
from .adapters.lokr import LoKrConfig
from .adapters.beft import BEFTConfig
from .adapters.boft import BOFTConfig
from .adapters.dora import DoRAConfig
from .adapters.dvora import DVoRAConfig
from .adapters.eva import EVAConfig
from .adapters.hira import HiRAConfig
from .adapters.hra import HRAConfig
from .adapters.delora import DeLoRAConfig
from .adapters.psoft import PSOFTConfig
from .adapters.gralora import GraLoRAConfig
from .adapters.supertuning import SuperTuningConfig
from .adapters.tinylora import TinyLoRAConfig
from .adapters.glora import GLoRAConfig
from .adapters.osf import OSFConfig
from .adapters.ln_tuning import LNTuningConfig
from .adapters.trainable_tokens import TrainableTokensConfig
from .adapters.pvera import PVeRAConfig
from .adapters.lily import LilyConfig
from .adapters.adamss import AdaMSSConfig
from .adapters.fourierft import FourierFTConfig
from .adapters.waveft import WaveFTConfig
from .adapters.ia3 import IA3Config
from .adapters.shira import SHiRAConfig
from .adapters.road import RoadConfig
from .adapters.miss import MiSSConfig
from .adapters.c3a import C3AConfig
from .adapters.vblora import VBLoRAConfig
from .adapters.randlora import RandLoRAConfig
from .adapters.lora import LoRAConfig
from .adapters.loraxs import LoRAXSConfig
from .adapters.loftq import LoftQConfig
from .adapters.mica import MiCAConfig
from .adapters.mora import MoRAConfig
from .adapters.multilora import MultiLoRAConfig
from .adapters.qalora import QALoRAConfig
from .adapters.oft import OFTConfig
from .adapters.orthogonal import OrthogonalConfig
from .adapters.nola import NOLAConfig
from .adapters.prefix_tuning import PrefixTuningConfig
from .adapters.prompt_tuning import PromptTuningConfig
from .adapters.ptuning import PTuningConfig
from .adapters.ptuning_v2 import PTuningV2Config
from .adapters.cpt import CPTConfig
from .adapters.qlora import QLoRAConfig
from .adapters.tiedlora import TiedLoRAConfig
from .adapters.registry import Method, methods
from .adapters.registry import register as register_method
from .adapters.vera import VeRAConfig
from .adapters.deft import DEFTConfig
from .adapters.unilora import UniLoRAConfig
from .adapters.lora_ga import LoRAGAConfig
from .adapters.peanut import PEANuTConfig
from .adapters.frod import FRoDConfig
from .adapters.alora import ALoRAConfig
from .adapters.corda import CorDAConfig
from .adapters.kasa import KaSAConfig
from .adapters.loretta import LoRETTAConfig
from .adapters.rosa import RoSAConfig
from .adapters.longlora import LongLoRAConfig
from .adapters.bdlora import BDLoRAConfig
from .adapters.velora import VeLoRAConfig
from .adapters.monteclora import MonteCLoRAConfig
from .autograd import Tensor, no_grad
from .backend import get_backend, set_backend
from .hooks import TrainingHook
from .errors import BackendError, CheckpointError, ConfigError, MiniPeftError, TrainingError
from .model import Model, load_model
from .quant import QuantizationConfig, nf4_dequantize, nf4_quantize
from .train import TrainingConfig
from . import optimizers
from . import procedures
from .serving import AdapterPool, Request

import os as _os

DEMO_MODEL = _os.path.join(_os.path.dirname(__file__), "data", "tiny-llama-chars")  # the model the package carries

__version__ = "0.1.0"
__all__ = ["load_model", "Model", "LoRAConfig", "TrainingConfig", "DEMO_MODEL", "Tensor", "no_grad", "set_backend", "get_backend",
           "QLoRAConfig", "DoRAConfig", "IA3Config", "LoHaConfig", "LoKrConfig", "VeRAConfig", "OFTConfig", "AdaLoRAConfig", "QuantizationConfig", "nf4_quantize", "nf4_dequantize",
           "PromptTuningConfig", "PrefixTuningConfig", "PTuningConfig", "PTuningV2Config", "CPTConfig", "LoRAXSConfig", "NOLAConfig", "TiedLoRAConfig", "DVoRAConfig", "MoRAConfig", "MultiLoRAConfig", "QALoRAConfig",
           "OrthogonalConfig", "MiCAConfig", "LoftQConfig", "EVAConfig", "HiRAConfig", "HRAConfig", "BEFTConfig", "FourierFTConfig", "WaveFTConfig", "SHiRAConfig", "RoadConfig", "MiSSConfig", "C3AConfig", "DeLoRAConfig", "PSOFTConfig", "BOFTConfig", "VBLoRAConfig", "RandLoRAConfig", "GraLoRAConfig",
           "SuperTuningConfig",
           "TinyLoRAConfig",
           "GLoRAConfig",
           "OSFConfig",
           "LNTuningConfig",
           "TrainableTokensConfig",
           "methods", "Method", "register_method", "TrainingHook", "optimizers", "procedures",
           "MiniPeftError", "ConfigError", "CheckpointError", "BackendError", "TrainingError",
           "DEFTConfig",
           "UniLoRAConfig",
           "LoRAGAConfig",
           "PEANuTConfig",
           "FRoDConfig",
           "PVeRAConfig",
           "ALoRAConfig",
           "CorDAConfig",
           "LilyConfig",
           "KaSAConfig",
           "LoRETTAConfig",
           "RoSAConfig",
           "AdapterPool", "Request",
           "AdaMSSConfig",
           "LongLoRAConfig",
           "BDLoRAConfig",
           "VeLoRAConfig",
           "MonteCLoRAConfig",
           ]
