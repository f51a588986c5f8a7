"""mmtrain: train multimodal engravings models on Accelerate and understand them as they train."""

__version__ = "0.1.0"
