"""Qwen's chat format at token level: prompts with images, tool-response turns, the tag tokens.

Two renderers of the same pieces: `TemplateChat` renders them through the tokenizer's own chat
template (`apply_chat_template(messages, tools=specs)`), so a released model sees exactly the
tokens it was trained on, tool listing included; `ChatFormat` writes Qwen3's layout by hand, for
tokenizers without a template (axpo's tiny character tokenizer). `ChatFormat.for_tokenizer` picks.
Each piece is rendered as text with one `<|image_pad|>` per image, tokenized as one string, and
each placeholder is then repeated as many times as the vision tower gives that image tokens (what
the Qwen3-VL processor does in transformers; it needs torchvision, axpo's preprocessor does not).
The same code serves Qwen3 / Qwen3-VL's real tokenizers (where `<tool_call>` etc. are single added
tokens) and the tiny one.

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

__all__ = ["ChatFormat", "TemplateChat", "valid_text"]

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
        # what the generation prompt leaves open for the model turn to close (a Thinking
        # template's "<think>\n"): read before a turn's text when its answer is extracted
        self.turn_opening = ""
        self.tool_call_open = self._tag("<tool_call>")
        self.tool_call_close = self._tag("</tool_call>")
        self.im_end = self._single("<|im_end|>")
        self.image_pad = self._single("<|image_pad|>") if image_processor is not None else None
        # placeholders the vision tower fills: a sampled one would make the next prefill's image
        # tokens disagree with its images, so samplers never sample them (random tiny models do)
        self.vision_placeholder_ids = frozenset(
            self._single(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
            if image_processor is not None and t in tokenizer.get_vocab())
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

    @staticmethod
    def for_tokenizer(tokenizer, image_processor=None, **options) -> "ChatFormat":
        """The chat format of a model's tokenizer: its own chat template when it has one
        (TemplateChat), else this hand-built Qwen3 layout. options: system_prompt, tool_specs."""
        cls = TemplateChat if getattr(tokenizer, "chat_template", None) else ChatFormat
        return cls(tokenizer, image_processor, **options)

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

    def _expand_images(self, ids: list[int], images: Sequence) -> list[int]:
        """Each `<|image_pad|>` placeholder of ids (one per image, as templates render them)
        repeated as many times as the vision tower gives that image tokens (as the processor
        does)."""
        if not images:
            return ids
        if self.image_processor is None:
            raise ValueError("this model has no vision tower: images cannot be placed in its prompt")
        at = [i for i, t in enumerate(ids) if t == self.image_pad]
        if len(at) != len(images):
            raise ValueError(f"the rendered turn has {len(at)} <|image_pad|> placeholder(s) for {len(images)} "
                             "image(s) (a question or template writing the placeholder itself?)")
        out, pos = [], 0
        for i, image in zip(at, images):
            out += ids[pos:i] + [self.image_pad] * self.image_processor.num_image_tokens(image)
            pos = i + 1
        return out + ids[pos:]

    def _encode_around(self, before: str, untrusted: str, after: str) -> list[int]:
        """before + untrusted + after tokenized as one string (so tokens merge across the seams
        as they would in the whole conversation), except that special-token strings inside
        `untrusted` are encoded as text (module docstring)."""
        ids, pos, head = [], 0, before
        for m in self._specials.finditer(untrusted):
            ids += self.encode(head + untrusted[pos:m.start()])
            ids += self.encode(m.group()[0]) + self._encode_as_text(m.group()[1:])
            pos, head = m.end(), ""
        return ids + self.encode(head + untrusted[pos:] + after)

    # -- the pieces as text (one <|image_pad|> per image; overridden by TemplateChat) -------------
    def _system(self) -> str:
        if self.system_prompt is None and not self.tool_specs:
            return ""
        text = self.system_prompt or "You are a helpful assistant."
        if self.tool_specs:
            text += _TOOLS_HEADER + "".join("\n" + json.dumps(s) for s in self.tool_specs) + _TOOLS_FOOTER
        return f"<|im_start|>system\n{text}<|im_end|>\n"

    def _prompt_text(self, question: str, num_images: int) -> str:
        return (self._system() + "<|im_start|>user\n" + _IMAGE * num_images
                + f"{question}<|im_end|>\n<|im_start|>assistant\n")

    def _tool_response_text(self, text: str, num_images: int) -> tuple[str, str, str]:
        """(before, text as placed, after) of a tool-response turn."""
        return ("<|im_end|>\n<|im_start|>user\n<tool_response>\n" + _IMAGE * num_images, text,
                "\n</tool_response><|im_end|>\n<|im_start|>assistant\n")

    def model_turn(self, think: str | None, content: str) -> str:
        """The text of a model turn that reasons `think` (None: no reasoning block) and then writes
        `content`, as the model samples it after the prompt or a tool response (SFT traces are
        written with it). The end-of-turn token is not included."""
        return content if think is None else f"<think>{think}</think>{content}"

    # -- token ids ---------------------------------------------------------------------------------
    def prompt(self, question: str, images: Sequence = ()) -> list[int]:
        """System turn (if any), the user turn with its images first, and the assistant header."""
        return self._expand_images(self.encode(self._prompt_text(question, len(images))), images)

    def tool_response(self, text: str, images: Sequence = ()) -> list[int]:
        """Closes the model's turn and wraps a tool's result as Qwen3 does (a user turn holding
        <tool_response>, its images first), then opens the next assistant turn. Never trained on.
        `text` is untrusted (module docstring)."""
        before, text, after = self._tool_response_text(valid_text(text), len(images))
        return self._expand_images(self._encode_around(before, text, after), images)


class TemplateChat(ChatFormat):
    """The conversation rendered by the tokenizer's own chat template, as
    `tokenizer.apply_chat_template(messages, tools=tool_specs)` renders it, so prompts and
    tool-response turns are token for token what the model was trained on (Qwen3, Qwen3-VL and
    their Thinking variants; any template in Qwen's chat-token layout).

    prompt: [system (if system_prompt)] + user (images first, then the question), with the
        generation prompt (a Thinking template's opens `<think>`).
    tool response: the text the template puts between an assistant message and the next
        generation prompt when a tool message follows it (the assistant's end of turn, the tool
        turn, the next generation prompt), found by rendering a conversation with a placeholder
        assistant message; the tool text as the template placed it (trimmed, if it trims).
    Images: the template's single `<|image_pad|>` per image, expanded as the processor would.
    A template that does not render these shapes is a ValueError when the ChatFormat is made.
    """

    _ASSISTANT = "AXPO-ASSISTANT-TURN"
    _QUESTION = "AXPO-QUESTION"

    def __init__(self, tokenizer, image_processor=None, *, system_prompt: str | None = None,
                 tool_specs: Sequence[dict] | None = None):
        super().__init__(tokenizer, image_processor, system_prompt=system_prompt, tool_specs=tool_specs)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("TemplateChat needs a tokenizer with a chat_template")
        self._bounds: dict[int, tuple[str, str]] = {}
        for num_images in (0, 1) if image_processor is not None else (0,):
            self._tool_response_text("", num_images)  # fails here, not mid-rollout, if the template does not fit
        # the generation prompt alone, e.g. "<|im_start|>assistant\n<think>\n"
        head = self._render(self._head() + [self._user(self._QUESTION, 0)], generation_prompt=False)
        self.generation_prompt = self._render(self._head() + [self._user(self._QUESTION, 0)])[len(head):]
        self.thinks_in_prompt = self.generation_prompt.rstrip().endswith("<think>")
        self.turn_opening = "<think>\n" if self.thinks_in_prompt else ""

    def _render(self, messages: list[dict], generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=self.tool_specs or None, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def _head(self) -> list[dict]:
        return [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]

    def _user(self, text: str, num_images: int, role: str = "user") -> dict:
        if not num_images:
            return {"role": role, "content": text}
        return {"role": role, "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text}]}

    def _prompt_text(self, question: str, num_images: int) -> str:
        return self._render(self._head() + [self._user(question, num_images)])

    def _tool_response_text(self, text: str, num_images: int) -> tuple[str, str, str]:
        base = self._head() + [self._user(self._QUESTION, 0), {"role": "assistant", "content": self._ASSISTANT}]
        if num_images not in self._bounds:  # the template's text around a tool message's text
            bounds = self._render(base + [self._user(self._ASSISTANT, num_images, role="tool")])
            if bounds.count(self._ASSISTANT) != 2:
                raise ValueError("the chat template does not render an assistant message followed by a tool "
                                 "message in a form axpo can split (Qwen's chat layout expected)")
            self._bounds[num_images] = tuple(bounds[bounds.index(self._ASSISTANT) + len(self._ASSISTANT):]
                                             .split(self._ASSISTANT))
        before, after = self._bounds[num_images]
        # the text as the template places it (trimmed, if it trims); the first placeholder is the
        # assistant's (the tool's text, untrusted, comes after it and may contain anything)
        rendered = self._render(base + [self._user(text, num_images, role="tool")])
        rendered = rendered[rendered.index(self._ASSISTANT) + len(self._ASSISTANT):]
        if rendered.startswith(before) and rendered.endswith(after) and len(rendered) >= len(before) + len(after):
            text = rendered[len(before):len(rendered) - len(after)]
        return before, text, after

    def model_turn(self, think: str | None, content: str) -> str:
        """As the template renders an assistant message reasoning `think` then writing `content`
        (after its generation prompt, before its end of turn)."""
        message = content if think is None else f"<think>\n{think}\n</think>\n\n{content}"
        base = self._head() + [self._user(self._QUESTION, 0)]
        prompt = self._render(base)
        full = self._render(base + [{"role": "assistant", "content": message}], generation_prompt=False)
        end = self._render(base + [{"role": "assistant", "content": self._ASSISTANT}],
                           generation_prompt=False).split(self._ASSISTANT)[-1]
        if not (full.startswith(prompt) and full.endswith(end)):
            raise ValueError("the chat template's rendered assistant message does not extend its generation prompt")
        return full[len(prompt):len(full) - len(end)]


_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
