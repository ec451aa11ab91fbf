"""glmtrt.runtime: the torch-free runtime (numpy, onnxruntime or tensorrt, tokenizers, pillow).

Host functions shared with the reference live here: preprocessing, 3-D positions, vision tables.
"""

__version__ = "0.1.0"
