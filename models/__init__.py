"""Built-in model plugins: one module per family, each contributing a ModelSource."""
