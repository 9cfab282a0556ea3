"""Model stage: the Keras network, the training loops (Keras fit, jitted JAX), ONNX export, pictures."""
