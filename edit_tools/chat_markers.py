"""The token ids around a user message in a model's chat template, for `routing_span: last_user_message`.

Found by rendering a few tiny conversations the way vLLM's chat endpoint does (template text,
tokenized without added special tokens) and comparing their token ids, so any template works
that puts a fixed header before each user message and a fixed end after it (Llama 3,
ChatML/Qwen, Mistral, ...):
- the user header: the ids common to the end of what precedes a first and a later user
  message (so a default system prompt or an earlier assistant turn is not part of it);
- the message end: the ids common to the start of what follows a user message, before the
  generation prompt and before an assistant's answer.
The ids are stored in the artifact, so serving needs no tokenizer to find the span.
"""

from __future__ import annotations

from vllm_memoir.core.route_span import LAST_USER_MESSAGE, PROMPT, RouteSpan

# Two contents whose first and last characters differ, so no tokenizer gives them a common first or last token.
_CONTENTS = ("alpha", "9 zulu!")
_ANSWER = "omega"


class ChatMarkersError(ValueError):
    pass


def _ids(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _common_suffix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def _around_last_user(tokenizer, before: list[dict[str, str]], add_generation_prompt: bool,
                      after: list[dict[str, str]] = ()) -> tuple[list[int], list[int]]:
    """(ids before, ids after) the last user message's content in `before + [user] + after`,
    from two renderings that differ only in that content."""
    a, b = (_ids(tokenizer, [*before, {"role": "user", "content": c}, *after], add_generation_prompt) for c in _CONTENTS)
    head = _common_prefix(a, b)
    tail = min(_common_suffix(a, b), len(a) - head, len(b) - head)
    return a[:head], a[len(a) - tail:]


def chat_markers(tokenizer) -> tuple[list[int], list[int]]:
    """(user_start, message_end) token ids of the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatMarkersError("routing_span last_user_message: the tokenizer has no chat template")
    try:
        first_head, first_tail = _around_last_user(tokenizer, [], add_generation_prompt=True)
        later_head, _ = _around_last_user(tokenizer, [{"role": "user", "content": _CONTENTS[0]},
                                                      {"role": "assistant", "content": _ANSWER}], add_generation_prompt=True)
        _, answered_tail = _around_last_user(tokenizer, [], add_generation_prompt=False,
                                             after=[{"role": "assistant", "content": _ANSWER}])
    except Exception as exc:  # a template may refuse a role or an order (raise_exception in Jinja)
        raise ChatMarkersError(f"routing_span last_user_message: the chat template cannot render a "
                               f"user/assistant/user conversation ({exc})") from exc
    header = first_head[len(first_head) - _common_suffix(first_head, later_head):]
    end = first_tail[:_common_prefix(first_tail, answered_tail)]
    if not header or not end:
        raise ChatMarkersError(
            "routing_span last_user_message: the chat template puts no fixed tokens "
            f"{'before' if not header else 'after'} a user message, so its span cannot be found; "
            "use routing_span: prompt"
        )
    return header, end


def route_span_for(kind: str, tokenizer) -> RouteSpan:
    """The RouteSpan an edit job with `routing_span: kind` records for this tokenizer."""
    if kind == PROMPT:
        return RouteSpan()
    if kind != LAST_USER_MESSAGE:
        raise ChatMarkersError(f"routing_span {kind!r} is not one of {PROMPT!r}, {LAST_USER_MESSAGE!r}")
    user_start, message_end = chat_markers(tokenizer)
    return RouteSpan(LAST_USER_MESSAGE, tuple(user_start), tuple(message_end))
