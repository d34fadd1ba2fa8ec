"""Qwen's chat format at token level: prompts with images, tool-response turns, the tag tokens.

Token ids are built by concatenating encoded pieces, and `<|image_pad|>` is repeated per image as
the vision tower will produce tokens (the Qwen3-VL processor, which does this in transformers,
needs torchvision). The same code serves Qwen3 / Qwen3-VL's real tokenizers (where `<tool_call>`
etc. are single added tokens) and axpo's tiny character tokenizer.

A tool's text is untrusted (it may print what the model asked it to, and error messages quote the
model's call): `encode_untrusted` makes it valid UTF-8 (lone surrogates, which a model can write
as a JSON escape, become U+FFFD) and encodes every special-token string in it as ordinary text,
so a tool can neither close the turn with `<|im_end|>` nor forge `<|image_pad|>` placeholders:
the string is encoded in two pieces (its first character, then the rest), which no added token
matches. Decoding gives back the text the tool printed.
"""
from __future__ import annotations

import json
import re
from typing import Sequence

__all__ = ["ChatFormat", "valid_text"]

_SURROGATES = re.compile("[\ud800-\udfff]")


def valid_text(text: str) -> str:
    """`text` with lone surrogates replaced by U+FFFD: encodable as UTF-8, whatever a model wrote."""
    return _SURROGATES.sub("\ufffd", text)

_TOOLS_HEADER = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
    "\"arguments\": <args-json-object>}\n</tool_call>"
)


class ChatFormat:
    """Builds the token ids of a conversation.

    tokenizer: a transformers tokenizer holding Qwen's chat tokens.
    image_processor: an axpo ImagePreprocessor (None for text-only models: images are refused).
    system_prompt: the system message (None: no system turn unless tools are listed).
    tool_specs: function specs to list in the system turn (Qwen3's format); None or [] lists none
        (tiny models trained on a fixed format do not need the long listing).
    """

    def __init__(self, tokenizer, image_processor=None, *, system_prompt: str | None = None,
                 tool_specs: Sequence[dict] | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.system_prompt = system_prompt
        self.tool_specs = list(tool_specs or [])
        self.tool_call_open = self._tag("<tool_call>")
        self.tool_call_close = self._tag("</tool_call>")
        self.im_end = self._single("<|im_end|>")
        self.image_pad = self._single("<|image_pad|>") if image_processor is not None else None
        eos = {self.im_end}
        endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        if isinstance(endoftext, int) and endoftext != tokenizer.unk_token_id:
            eos.add(endoftext)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else endoftext
        specials = set(tokenizer.get_added_vocab()) | set(tokenizer.all_special_tokens)
        # longest first, so that a special containing another is matched whole
        self._specials = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True) if t))

    def _tag(self, text: str) -> tuple[int, ...]:
        ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
        if not ids:
            raise ValueError(f"tokenizer encodes {text!r} to no tokens")
        return ids

    def _single(self, text: str) -> int:
        ids = self._tag(text)
        if len(ids) != 1:
            raise ValueError(f"tokenizer must encode {text!r} as one token (Qwen's chat tokens), got {list(ids)}")
        return ids[0]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def encode_untrusted(self, text: str) -> list[int]:
        """Tool output as plain text tokens: valid UTF-8, no special token (module docstring)."""
        return self._encode_as_text(valid_text(text))

    def _encode_as_text(self, text: str) -> list[int]:
        ids, pos = [], 0
        for m in self._specials.finditer(text):
            ids += self.encode(text[pos:m.start()])
            ids += self.encode(m.group()[0]) + self._encode_as_text(m.group()[1:])
            pos = m.end()
        return ids + self.encode(text[pos:])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def image_tokens(self, image) -> list[int]:
        if self.image_processor is None:
            raise ValueError("this model has no vision tower: images cannot be placed in its prompt")
        n = self.image_processor.num_image_tokens(image)
        return self.encode("<|vision_start|>") + [self.image_pad] * n + self.encode("<|vision_end|>")

    def _system(self) -> str:
        if self.system_prompt is None and not self.tool_specs:
            return ""
        text = self.system_prompt or "You are a helpful assistant."
        if self.tool_specs:
            text += _TOOLS_HEADER + "".join("\n" + json.dumps(s) for s in self.tool_specs) + _TOOLS_FOOTER
        return f"<|im_start|>system\n{text}<|im_end|>\n"

    def prompt(self, question: str, images: Sequence = ()) -> list[int]:
        """System turn (if any), the user turn with its images first, and the assistant header."""
        ids = self.encode(self._system() + "<|im_start|>user\n")
        for image in images:
            ids += self.image_tokens(image)
        return ids + self.encode(f"{question}<|im_end|>\n<|im_start|>assistant\n")

    def tool_response(self, text: str, images: Sequence = ()) -> list[int]:
        """Closes the model's turn and wraps a tool's result as Qwen3 does (a user turn holding
        <tool_response>), then opens the next assistant turn. Never trained on. `text` is
        untrusted (encode_untrusted)."""
        ids = self.encode("<|im_end|>\n<|im_start|>user\n<tool_response>\n")
        for image in images:
            ids += self.image_tokens(image)
        return ids + self.encode_untrusted(text) + self.encode("\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
