"""crowdtrain.codec."""
