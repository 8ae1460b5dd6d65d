"""Synthetic knowledge data: pools, tokenizer, bioS, bioD, exposure streams, QA pairs."""
