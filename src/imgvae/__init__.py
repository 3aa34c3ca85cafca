"""imgvae: train, inspect and compare VAEs on natural-scene images."""

from .config import Config, load_config
from .models import MODELS, build_model
from .train import train

__version__ = "0.1.0"
__all__ = ["Config", "load_config", "MODELS", "build_model", "train", "__version__"]
