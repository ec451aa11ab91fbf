"""glmtrt.export: HF checkpoint -> ONNX graphs + manifest (needs torch, onnx, onnxscript; never used by the runtime).

``export_model(model, out)`` writes an engines folder: vision.onnx, prefill.onnx, decode.onnx (the graph
contract in :mod:`glmtrt.export.graphs`), embed_tokens.npy, the tokenizer, and manifest.json.
"""

from .folder import EXPORTABLE_FAMILIES, PRECISIONS, export_folder, export_model

__all__ = ["EXPORTABLE_FAMILIES", "PRECISIONS", "export_folder", "export_model"]
