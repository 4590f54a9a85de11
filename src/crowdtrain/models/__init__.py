"""crowdtrain.models."""
