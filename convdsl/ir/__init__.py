"""The intermediate representation: a networkx graph of ops with symbolic shapes."""
from .graph import Graph, Node, ParamDecl, ValueRef
from .types import TensorType

__all__ = ["Graph", "Node", "ParamDecl", "TensorType", "ValueRef"]
