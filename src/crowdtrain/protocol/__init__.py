"""crowdtrain.protocol."""
