"""crowdtrain.robust."""
