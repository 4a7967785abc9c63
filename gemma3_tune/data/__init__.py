"""Data: tokenizer, chat template + loss mask, images, sources, packing, collation."""
