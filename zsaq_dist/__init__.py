"""zsaq_dist: zero-shot sharpness-aware quantization of causal LMs, distributed with Ray + DeepSpeed."""

__version__ = "0.1.0"
