"""A Qwen3-style tokenizer with a chat template, built offline: byte-level BPE trained here with
Qwen2's pre-tokenizer regex (so "\\n\\n", " {" and the like merge as in the real tokenizer, which
is what makes token-level equality with the template a real test), Qwen's chat tokens added, and
a chat template written in the layout of Qwen3-VL's (tool listing in the system turn, images as
`<|vision_start|><|image_pad|><|vision_end|>`, tool messages grouped into user turns of
`<tool_response>`s, reasoning kept for assistant turns after the last real query) in two variants:
Instruct (generation prompt `<|im_start|>assistant\\n`) and Thinking (`...assistant\\n<think>\\n`)."""
from __future__ import annotations

QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>"]
TAG_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]

_TEMPLATE = r"""
{%- macro render_content(content) %}
    {%- if content is string %}{{- content }}
    {%- else %}{%- for item in content %}
        {%- if item.type == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}
        {%- elif item.type == 'text' %}{{- item.text }}{%- endif %}
    {%- endfor %}{%- endif %}
{%- endmacro %}
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}{{- render_content(messages[0].content) + '\n\n' }}{%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}{{- "\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + render_content(messages[0].content) + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == 'user' %}
        {%- set content = render_content(message.content) %}
        {%- if not(content.startswith('<tool_response>') and content.endswith('</tool_response>')) %}
            {%- set ns.multi_step_tool = false %}
            {%- set ns.last_query_index = index %}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = render_content(message.content) %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning_content = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (THINKING or reasoning_content) %}
            {{- '<|im_start|>assistant\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if THINKING %}{{- '<think>\n' }}{%- endif %}
{%- endif %}
"""


def qwen3_vl_template(thinking: bool) -> str:
    return _TEMPLATE.strip().replace("THINKING", "true" if thinking else "false")


def _corpus() -> list[str]:
    import json

    calls = [json.dumps({"name": "zoom", "arguments": {"bbox_2d": [i, i + 4, i + 16, i + 20], "image_index": 0}})
             for i in range(20)]
    lines = ["I need to zoom into the cell to read the digit.", "The digit is 7, so the answer is 7.",
             "Zoomed into [0, 0, 16, 16] of image 0: 32x32 pixels.", "print(6 * 7)\n42\n\n", "What is 3 + 4?",
             "You are a helpful assistant.", "Let me think step by step.\n\n", "  indented\n\n\nlines  \n",
             "# Tools\n\nYou may call one or more functions to assist with the user query.\n"]
    return (lines + calls) * 20


def build_qwen_like_tokenizer(thinking: bool = True):
    """A PreTrainedTokenizerFast with Qwen's chat tokens, byte-level BPE and a Qwen3-VL-style
    chat template (module docstring)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=CHAT_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=CHAT_TOKENS[1:])
    out.chat_template = qwen3_vl_template(thinking)
    return out
