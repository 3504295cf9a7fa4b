"""convdsl: a language for convolutional networks and its compiler.

    net = convdsl.compile("examples/lenet5.cdsl", net="LeNet5")
    y = net(torch.randn(8, 1, 32, 32))
"""
import importlib

from .errors import ConvDSLError, ConvDSLInputError, ConvDSLWarning
from .from_torch import from_torch  # imports torch only when called

__version__ = "0.1.0"

# Imported on first use (PEP 562), so `import convdsl.lexer` (Pygments loads it
# for every file it guesses a lexer for) and `import convdsl.log` stay free of torch.
_LAZY = {"compile": "compiler", "CompiledNet": "module"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    try:  # `convdsl.ops` etc. without importing them first, as before
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as missing:
        if missing.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module 'convdsl' has no attribute '{name}'") from None


__all__ = ["CompiledNet", "ConvDSLError", "ConvDSLInputError", "ConvDSLWarning", "__version__",
           "compile", "from_torch"]
