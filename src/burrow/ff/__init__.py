"""Forward-Forward (Hinton 2022) on MNIST: layer-local learning without backpropagation between
layers, its supervised and unsupervised settings, and a backprop baseline of the same network
(docs/forward_forward.md)."""
