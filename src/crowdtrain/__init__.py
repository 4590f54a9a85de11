"""crowdtrain: train one neural network with compute donated by many volunteers."""

__version__ = "0.1.0"
