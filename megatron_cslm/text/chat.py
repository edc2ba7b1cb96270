"""The Llama-3.1 chat format, written once: its marker strings, a turn header, and the Jinja template.

Pretraining replay documents, SFT samples, the exported tokenizer's `chat_template` and the inference stop
tokens all build on these strings, so the format a model is trained on is the format it is prompted with.
Content is trimmed like Meta's template, so `transformers`' `apply_chat_template` matches the SFT layout.
"""
from __future__ import annotations

BOS = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
EOT = "<|eot_id|>"  # end of a turn; a chat-tuned model stops here
START_HEADER, END_HEADER = "<|start_header_id|>", "<|end_header_id|>"
ROLES = ("system", "user", "assistant")


def header(role: str) -> str:
    """The text that opens a turn of `role`."""
    return f"{START_HEADER}{role}{END_HEADER}\n\n"


LLAMA31_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    f"{{{{ '{START_HEADER}' + message['role'] + '{END_HEADER}\\n\\n' + message['content'] | trim"
    f" + '{EOT}' }}}}"
    "{% endfor %}{% if add_generation_prompt %}"
    f"{{{{ '{START_HEADER}assistant{END_HEADER}\\n\\n' }}}}{{% endif %}}"
)
