"""Run an exported artifact directory: tokenizer, chat format, generation backends."""
