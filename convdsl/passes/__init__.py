"""Graph passes over the IR, run by the pass manager (manager.PIPELINE)."""
from .manager import PIPELINE, run_pipeline, verify

__all__ = ["PIPELINE", "run_pipeline", "verify"]
