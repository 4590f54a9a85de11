"""crowdtrain.sim."""
