"""Text side of the speech-text vocabulary: tokenizer, unit layout and validation, markup, chat, language."""
