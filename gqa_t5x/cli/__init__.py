"""Console scripts: one thin module each (flags -> one library call -> where the results went)."""
