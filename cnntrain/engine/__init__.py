"""The engine: layers, loss, model and optimiser in pure NumPy. No files, YAML or terminal here."""
