"""orpo-distill: distil a teacher LLM into a student of another architecture and tokenizer from the teacher's text
alone, with mixed-policy ORPO (ORPO-Distill, arXiv 2509.25100)."""

__version__ = "0.1.0"
