"""hf-batchsched: Hugging Face Trainer add-ons for batch-size ramping, LR policies, sharpness and stability."""

__version__ = "0.1.0"
