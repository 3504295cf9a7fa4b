"""convdsl: a language for convolutional networks and its compiler.

    net = convdsl.compile("examples/lenet5.cdsl", net="LeNet5")
    y = net(torch.randn(8, 1, 32, 32))
"""
from .compiler import compile
from .errors import ConvDSLError, ConvDSLInputError, ConvDSLWarning
from .module import CompiledNet

__version__ = "0.1.0"

__all__ = ["compile", "CompiledNet", "ConvDSLError", "ConvDSLInputError", "ConvDSLWarning",
           "__version__"]
