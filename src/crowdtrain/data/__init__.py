"""crowdtrain.data."""
