"""Fashion-MNIST data, the shipped generator and classifier, and their training."""
