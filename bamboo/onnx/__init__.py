"""ONNX: export with the sparse FFN lowered to standard ops, and the rewrite of foreign ONNX graphs."""
from bamboo.onnx.export import export_onnx

__all__ = ["export_onnx", "optimize"]


def optimize(in_path, out_path, mode: str = "exact"):
    """Rewrite the dReLU / ReGLU FFNs of an ONNX model bamboo did not write into the sparse form."""
    from bamboo.onnx.foreign_rewrite import optimize as run

    return run(in_path, out_path, mode=mode)
