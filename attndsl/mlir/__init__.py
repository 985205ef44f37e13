"""The IR as MLIR: an `attn` dialect declared in IRDL, loaded into torch-mlir's bindings.

    text = to_mlir({"performer": planned.root})    # a module that parses and verifies
    roots = from_mlir(text)                         # {"performer": Node}, == the original IR
"""
from .emit import to_mlir, to_module
from .parse import MLIRFormatError, from_mlir, from_module

__all__ = ["to_mlir", "to_module", "from_mlir", "from_module", "MLIRFormatError"]
