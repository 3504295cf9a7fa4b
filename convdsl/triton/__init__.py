"""The triton backend: IR nodes lowered to generated Triton kernels.

    lowering.py   IR graph → a list of KernelPlans (elementwise chains fused)
    codegen.py    Jinja templates in kernels/ → kernel source (deterministic)
    loader.py     kernel source → a callable kernel (compiled, or interpreted on CPU)
    runtime.py    runs the plans inside torch.autograd
    aot.py        ahead-of-time compilation for a GPU target, with a resource report
    families/     one module per kernel family: what to render, how to launch
"""
