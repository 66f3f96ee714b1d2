"""Triton kernels and their launchers: tensors in, tensors out, no autograd.

Import this module only after deciding on `TRITON_INTERPRET` (Triton reads it at import). Within `nf4`
only `nf4.dispatch` imports it.
"""

if __name__ != "nf4.kernels":
    # NOTE: this folder is `nf4.kernels`, installed from `kernels/`. Python started in the repository
    # root finds it as a top-level `kernels` too, the name of Hugging Face's package, which
    # bitsandbytes, transformers and peft import. Step aside: where the real package is installed,
    # load it from the rest of sys.path. Where it is not, stay an empty module: importers probing for
    # its names get the ImportError they get from an incompatible version and carry on (raising
    # ModuleNotFoundError instead breaks `import peft`: transformers has already found this folder).
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path)
    if _spec is not None:
        _real = importlib.util.module_from_spec(_spec)
        sys.modules[__name__] = _real
        _spec.loader.exec_module(_real)
else:
    from nf4.kernels.dequantize import dequantize_nf4
    from nf4.kernels.quantize import quantize_absmax, quantize_nf4

    __all__ = ["dequantize_nf4", "quantize_absmax", "quantize_nf4"]
