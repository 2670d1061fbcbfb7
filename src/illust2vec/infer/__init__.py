"""Using a model: the Tagger (the Python API), its torch and ONNX backends, image preparation, batch tagging."""
