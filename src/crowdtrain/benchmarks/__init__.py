"""crowdtrain.benchmarks."""
