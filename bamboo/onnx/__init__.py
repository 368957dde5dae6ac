"""ONNX: an exported program with the sparse FFN lowered to standard ops (bamboo.export_onnx is the entry point
from a model), and the rewrite of foreign ONNX graphs."""
from bamboo.onnx.export import lower_to_onnx, save_onnx

__all__ = ["lower_to_onnx", "optimize", "save_onnx"]


def optimize(in_path, out_path, mode: str = "exact"):
    """Rewrite the dReLU / ReGLU FFNs of an ONNX model bamboo did not write into the sparse form."""
    from bamboo.onnx.foreign_rewrite import optimize as run

    return run(in_path, out_path, mode=mode)
