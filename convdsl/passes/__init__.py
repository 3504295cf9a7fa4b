"""Graph passes over the IR, run by the pass manager (manager.PIPELINE)."""
from .manager import (
                      BACKWARD_PIPELINE,
                      PIPELINE,
                      PassStep,
                      run_backward_pipeline,
                      run_pipeline,
                      trace_passes,
                      verify,
)

__all__ = ["BACKWARD_PIPELINE", "PIPELINE", "PassStep", "run_backward_pipeline", "run_pipeline",
           "trace_passes", "verify"]
