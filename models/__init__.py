"""Model definitions, the name → constructor table (zoo), the export graphs and the saliency graph.

Imports torch only, never ``pipeline`` or ``serving``.
"""

from models.lenet5 import LeNet5, lenet5
from models.vgg16 import VGG, vgg16, vgg16_bn
from models.zoo import MODELS, build_model, load_init_weights

__all__ = ["MODELS", "VGG", "LeNet5", "build_model", "lenet5", "load_init_weights", "vgg16", "vgg16_bn"]
