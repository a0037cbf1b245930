"""Fine-tune BLIP image-captioning models from YAML recipes with the Hugging Face Trainer and Accelerate."""

__version__ = "0.1.0"
