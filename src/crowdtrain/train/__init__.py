"""crowdtrain.train."""
