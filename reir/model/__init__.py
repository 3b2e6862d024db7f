"""The network: the shared ResNet stem, its branches, where they run, and the meta-class code words they learn."""
