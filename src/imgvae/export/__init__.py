"""What leaves imgvae: a trained autoencoder as a diffusers AutoencoderKL / VQModel folder (or
imgvae's own safetensors), and with its flow prior the whole generator as a diffusers pipeline
folder (its pipeline.py: a class that needs only torch and diffusers), each with a model card whose
code runs. `export_model` is what `imgvae export` calls."""

from imgvae.export.folder import FORMATS, export_model

__all__ = ["FORMATS", "export_model"]
