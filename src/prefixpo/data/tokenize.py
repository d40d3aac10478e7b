"""``Example`` -> token ids of the prompt and of each response, then truncation.

Which text goes through the chat template follows TRL's ``DPOTrainer``: chat message lists are
rendered with the tokenizer's chat template; plain strings are raw text, never templated, unless
``use_chat_template=True`` opts them in (``False`` keeps messages out of the template too).

With the template the prompt is rendered with the generation prompt and each response as the
whole conversation; the prompt's ids must be a prefix of the conversation's ids, and the response
ids are the rest. So ``prompt_ids + response_ids`` is exactly the template's tokenization of the
conversation (its BOS once, its end-of-turn tokens where it puts them). A template that does not
give a clean prefix is an error naming the template, never a silent mis-split.

Raw text: the prompt and ``prompt + response + EOS`` are tokenized as the tokenizer does by itself
(with its special tokens, e.g. BOS), EOS text appended only to a response that does not already
end with it; the prompt ids are the tokens both share, the response ids the rest (so tokens that
merge across the boundary belong to the response, as in TRL). Chat messages in raw mode (no
template, or Anthropic-HH transcripts) are written as ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from prefixpo.data.errors import DataError, RowError
from prefixpo.data.formats import Example, Message, RowFiltered

PLAIN_ROLES = {"system": "System", "user": "Human", "assistant": "Assistant", "tool": "Tool"}
TEMPLATE, RAW = "template", "raw"


@dataclass(frozen=True)
class TokenizerInfo:
    """What the pipeline needs to know about a tokenizer, computed once (and picklable)."""

    has_template: bool
    template_text: bool  # strings go through the chat template (use_chat_template=True)
    template_messages: bool  # message lists go through the chat template
    eos_text: str | None  # appended to a raw response that does not end with it
    bos_token_id: int | None  # kept at the start of a prompt truncated from the start
    template_writes_eos: bool = False  # the template ends an assistant turn with the EOS text


def describe_tokenizer(tokenizer: Any, use_chat_template: bool | None) -> TokenizerInfo:
    """``use_chat_template``: ``None`` templates message lists only (TRL's rule), ``True`` strings
    too, ``False`` nothing."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template and not has_template:
        raise DataError("use_chat_template=True but the tokenizer has no chat_template: set "
                        "tokenizer.chat_template, or use_chat_template=False for plain text")
    eos = getattr(tokenizer, "eos_token", None) or None
    return TokenizerInfo(has_template, bool(use_chat_template), has_template and use_chat_template is not False,
                         eos, tokenizer.bos_token_id, has_template and _template_writes_eos(tokenizer, eos))


def _template_writes_eos(tokenizer: Any, eos_text: str | None) -> bool:
    """Whether the chat template writes the EOS text right after an assistant turn's content."""
    if not eos_text:
        return False
    probe = "Zq9"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": probe}], tokenize=False)
    except Exception:  # a template that refuses the probe: assume not
        return False
    return probe + eos_text in text


def rendering(example: Example, info: TokenizerInfo, from_text: bool | None = None) -> str:
    """``"template"`` or ``"raw"``: how an example's text becomes tokens. ``from_text`` says the
    data were strings (default: the prompt is a string; an HH transcript parsed into messages is text).

    >>> info = TokenizerInfo(True, False, True, "</s>", None)
    >>> rendering(Example("Hi", ["Yo", "No"]), info), rendering(Example([{"role": "user", "content": "Hi"}], []), info)
    ('raw', 'template')
    """
    text = isinstance(example.prompt, str) if from_text is None else from_text
    return TEMPLATE if (info.template_text if text else info.template_messages) else RAW


def tokenizer_fingerprint(tokenizer: Any, info: TokenizerInfo) -> str:
    """A hash of everything in the tokenizer that changes token ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [type(tokenizer).__name__, vocab, str(getattr(tokenizer, "chat_template", None)),
             json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str), repr(info)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def render_plain(messages: list[Message], generation_prompt: bool = False) -> str:
    """Chat messages as plain text, for raw mode.

    >>> render_plain([{"role": "user", "content": "Hi"}], generation_prompt=True)
    '\\n\\nHuman: Hi\\n\\nAssistant:'
    """
    text = "".join(f"\n\n{PLAIN_ROLES[m['role']]}: {m['content']}" for m in messages)
    return text + "\n\nAssistant:" if generation_prompt else text


def with_eos(text: str, eos_text: str | None) -> str:
    """The response text with EOS appended once: not when it already ends with it (TRL's rule).

    >>> with_eos("Sure.", "<|end|>"), with_eos("Sure.<|end|>", "<|end|>"), with_eos("Sure.", None)
    ('Sure.<|end|>', 'Sure.<|end|>', 'Sure.')
    """
    return text if not eos_text or text.endswith(eos_text) else text + eos_text


def _plain_texts(example: Example, eos_text: str | None) -> tuple[str, list[str]]:
    """The raw prompt text and each whole ``prompt + response + EOS`` text.

    >>> _plain_texts(Example("Q: 2+2?", [" 4", " 5</s>"]), "</s>")
    ('Q: 2+2?', ['Q: 2+2? 4</s>', 'Q: 2+2? 5</s>'])
    """
    if isinstance(example.prompt, str):
        prompt, responses = example.prompt, list(example.responses)
    else:  # the generation prompt ends in "Assistant:", so a response's first (assistant) turn is " content"
        prompt = render_plain(example.prompt, generation_prompt=True)
        responses = [" " + r[0]["content"] + render_plain(r[1:]) for r in example.responses]  # type: ignore[index]
    return prompt, [prompt + with_eos(r, eos_text) for r in responses]  # type: ignore[operator]


def encode(tokenizer: Any, texts: list[str], special_tokens: bool = False) -> list[list[int]]:
    """``tokenizer(texts, add_special_tokens=special_tokens)["input_ids"]``, straight from the Rust
    tokenizer when there is one (no offsets or Python encodings: about twice as fast)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(texts, add_special_tokens=special_tokens)["input_ids"]
    fast = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in fast(texts, add_special_tokens=special_tokens)]


def _as_chat(turns: Any, role: str) -> list[Message]:
    return [{"role": role, "content": turns}] if isinstance(turns, str) else turns


def without_eos(text: str, eos_text: str | None) -> str:
    """A string response for a template that writes EOS itself: its own trailing EOS text removed.

    >>> without_eos("Sure.<|end|>", "<|end|>"), without_eos("Sure.", "<|end|>")
    ('Sure.', 'Sure.')
    """
    return text[:-len(eos_text)] if eos_text and text.endswith(eos_text) else text


def _render_chat(tokenizer: Any, example: Example, info: TokenizerInfo) -> tuple[str, list[str]]:
    """Prompt (with the generation prompt) and whole conversations through the chat template. A
    string response (``use_chat_template=True``) ending with the EOS text loses it when the template
    writes EOS after the turn, so EOS comes once; message contents are rendered as they are (as in TRL)."""
    prompt = _as_chat(example.prompt, "user")
    eos = info.eos_text if info.template_writes_eos else None
    try:
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = [tokenizer.apply_chat_template(prompt + _as_chat(without_eos(r, eos) if isinstance(r, str) else r,
                                                                "assistant"), tokenize=False)
                for r in example.responses]
    except Exception as e:  # jinja's raise_exception, e.g. "System role not supported"
        raise RowError("template_rejects", "prompt", f"the chat template cannot render this conversation: {e}",
                       "change the conversation, or the template") from None
    return prompt_text, full


def _template_error(detail: str) -> RowError:
    return RowError("template", "-", f"the chat template does not render the prompt (with the generation "
                    f"prompt) as a prefix of the whole conversation: {detail}. Prompt and response ids "
                    "cannot be split without changing the tokenization",
                    "use a template whose generation prompt is a prefix of the rendered conversation "
                    "(no text that depends on later turns, no merges across the boundary)")


def tokenize_examples(examples: list[Example], tokenizer: Any, info: TokenizerInfo,
                      from_text: list[bool] | None = None,
                      ) -> list[tuple[list[int], list[list[int]]] | RowError]:
    """Tokenize a batch of examples together; a failed example gives its ``RowError`` in place.
    ``from_text[i]`` says example ``i`` came from strings (see ``rendering``)."""
    modes = [rendering(ex, info, None if from_text is None else from_text[i]) for i, ex in enumerate(examples)]
    rendered: list[tuple[str, list[str]] | RowError] = []
    for ex, mode in zip(examples, modes, strict=True):
        try:
            rendered.append(_render_chat(tokenizer, ex, info) if mode == TEMPLATE else _plain_texts(ex, info.eos_text))
        except RowError as e:
            rendered.append(e)
    batches = {m: [t for r, mode in zip(rendered, modes, strict=True) if mode == m and not isinstance(r, RowError)
                   for t in (r[0], *r[1])] for m in (TEMPLATE, RAW)}
    ids = {m: iter(encode(tokenizer, texts, special_tokens=m == RAW) if texts else [])
           for m, texts in batches.items()}
    out: list[tuple[list[int], list[list[int]]] | RowError] = []
    for r, mode in zip(rendered, modes, strict=True):
        if isinstance(r, RowError):
            out.append(r)
            continue
        prompt_text, rest = r
        prompt_ids = next(ids[mode])
        rest_ids = [next(ids[mode]) for _ in rest]
        out.append(_split_template(prompt_text, rest, prompt_ids, rest_ids) if mode == TEMPLATE
                   else split_shared_prefix(prompt_ids, rest_ids))
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids ``a`` and ``b`` share.

    >>> common_prefix([1, 2, 3], [1, 2, 4, 5])
    2
    """
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def split_shared_prefix(prompt_ids: list[int], full_ids: list[list[int]],
                        ) -> tuple[list[int], list[list[int]]] | RowError:
    """Raw text: the prompt is what the tokenized prompt and every tokenized whole text share; each
    response is the rest of its whole text (a token merged across the boundary is the response's).

    >>> split_shared_prefix([1, 7, 8], [[1, 7, 8, 9, 2], [1, 7, 10, 2]])
    ([1, 7], [[8, 9, 2], [10, 2]])
    """
    n = min(common_prefix(prompt_ids, ids) for ids in full_ids)
    if n == 0:
        return RowError("empty", "prompt", "the prompt has no tokens of its own (it merges into the responses)",
                        "end the prompt with a separator, or remove the row")
    if any(len(ids) == n for ids in full_ids):
        return RowError("empty", "responses", "a response renders to no tokens", "remove the row")
    return full_ids[0][:n], [ids[n:] for ids in full_ids]


def _split_template(prompt_text: str, full_texts: list[str], prompt_ids: list[int],
                    full_ids: list[list[int]]) -> tuple[list[int], list[list[int]]] | RowError:
    n = len(prompt_ids)
    for text, ids in zip(full_texts, full_ids, strict=True):
        if not text.startswith(prompt_text):
            at = next(i for i, (a, b) in enumerate(zip(prompt_text, text)) if a != b) \
                if any(a != b for a, b in zip(prompt_text, text)) else min(len(prompt_text), len(text))
            return _template_error(f"the texts differ at character {at} "
                                   f"(prompt {prompt_text[at:at + 20]!r}, conversation {text[at:at + 20]!r})")
        if ids[:n] != prompt_ids:
            return _template_error(f"the texts agree but the token ids differ (prompt ends {prompt_ids[-3:]}, "
                                   f"conversation has {ids[max(n - 3, 0):n + 1]}): the tokenizer merges "
                                   "across the boundary")
        if len(ids) == n:
            return RowError("empty", "responses", "a response renders to no tokens", "remove the row")
    return prompt_ids, [ids[n:] for ids in full_ids]


def truncate(prompt: list[int], responses: list[list[int]], max_length: int | None,
             max_prompt_length: int | None, mode: str, bos_id: int | None = None, pairs: bool = True,
             ) -> tuple[list[int], list[list[int]], bool]:
    """Apply the length limits; returns ``(prompt, responses, truncated)``.

    ``keep_end`` keeps the end of a long prompt (and its leading BOS), ``keep_start`` its start;
    responses keep their start. ``drop`` raises ``RowFiltered``, ``error`` a ``RowError``. With
    ``pairs`` (preference data), responses that differ only past ``max_length`` raise ``RowFiltered``.

    >>> truncate([1, 5, 6, 7, 8], [[9, 9, 9]], max_length=6, max_prompt_length=3, mode="keep_end", bos_id=1)
    ([1, 7, 8], [[9, 9, 9]], True)
    >>> truncate([1, 5, 6, 7, 8], [[9, 9, 9]], max_length=6, max_prompt_length=3, mode="keep_start")
    ([1, 5, 6], [[9, 9, 9]], True)
    """
    longest = max(len(r) for r in responses)
    too_long = (max_prompt_length is not None and len(prompt) > max_prompt_length) or \
        (max_length is not None and len(prompt) + longest > max_length)
    if not too_long:
        return prompt, responses, False
    limits = f"max_length={max_length}, max_prompt_length={max_prompt_length}"
    what = f"prompt {len(prompt)} + longest response {longest} tokens exceed {limits}"
    if mode == "drop":
        raise RowFiltered("too_long", "prompt/responses", what)
    if mode == "error":
        raise RowError("too_long", "prompt/responses", what, "raise the limits, or set truncation")
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        if mode == "keep_start":
            prompt = prompt[:max_prompt_length]
        else:
            head = prompt[:1] if bos_id is not None and prompt[:1] == [bos_id] else []
            prompt = head + prompt[len(prompt) - (max_prompt_length - len(head)):]
    if max_length is not None:
        if len(prompt) >= max_length:
            raise RowError("too_long", "prompt", f"the prompt has {len(prompt)} tokens, leaving no room for a "
                           f"response within max_length={max_length}", "set max_prompt_length below max_length")
        responses = [r[:max_length - len(prompt)] for r in responses]
        if pairs and len({tuple(r) for r in responses}) < len(responses):  # they differ only past the limit
            raise RowFiltered("identical_when_truncated", "responses",
                              f"the responses are identical within max_length={max_length} (they differ after it), "
                              "so the pair teaches nothing; raise max_length to keep the row")
    return prompt, responses, True
