"""Other frameworks' formats: Hugging Face transformers' Llama directories (`hf`)."""

from burrow.interop.hf import export_hf, import_hf

__all__ = ["export_hf", "import_hf"]
