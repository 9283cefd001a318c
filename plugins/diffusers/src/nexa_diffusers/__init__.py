"""nexa-diffusers: image generation (``/v1/images/generations``) with Hugging Face diffusers."""

__version__ = "0.1.0"
