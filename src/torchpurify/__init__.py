"""torchpurify: find and remove backdoors in trained neural networks, neuron by neuron."""

__version__ = "0.1.0"
