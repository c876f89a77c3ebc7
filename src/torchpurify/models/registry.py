"""The model registry: ``MODELS.get(name)(input_shape, num_classes, **kwargs) -> nn.Module``."""

from torchpurify.registry import Registry

MODELS = Registry("model")
