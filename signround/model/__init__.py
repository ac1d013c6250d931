"""Model loading and structure discovery."""
