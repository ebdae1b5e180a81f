"""Structured generation: grammar compilation and per-request grammar state (xgrammar). See backend.py and
docs/STRUCTURED.md. The token bitmask is applied to the logits by `strata.ops.apply_token_bitmask`."""
from strata.structured.backend import GrammarBackend, RequestGrammar, choice_ebnf

__all__ = ["GrammarBackend", "RequestGrammar", "choice_ebnf"]
