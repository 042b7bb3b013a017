"""fgsn-daemon: Fine-Grained Safety Neurons with training-free continual projection."""

__version__ = "0.1.0"
