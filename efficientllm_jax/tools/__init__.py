"""Tools: Hugging Face checkpoint import (import_hf) and the numpy conversion it uses (convert)."""
