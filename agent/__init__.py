"""edge-agent: run the best-fitting quantized LLM on an edge device, driven over MQTT."""

__version__ = "0.1.0"
