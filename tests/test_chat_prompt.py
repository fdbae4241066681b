"""Chat content parts -> chunked prompt: exact part offsets in the rendered template (embedded tokenizer)."""

from __future__ import annotations

import pytest

from sglang_holes.chunks.chat import SEPARATOR, chat_chunked_prompt, parse_settings

DOCS = ["Doc A: the red box holds 12 coins.", "Doc B: the blue box is empty.\nIt was opened twice.",
        "  Doc C starts with spaces and ends with a newline\n"]


@pytest.fixture
def fns(tokenizer):
    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return render, encode


def _messages(parts: list[str]) -> list[dict]:
    return [{"role": "system", "content": "Answer from the documents."},
            {"role": "user", "content": [{"type": "text", "text": p} for p in parts]}]


def test_parts_map_to_exact_token_offsets(tokenizer, fns):
    render, encode = fns
    parts = [*DOCS, "Question: which box is empty?"]
    p = chat_chunked_prompt(_messages(parts), render, encode, {"policy": "query", "ratio": 0.1})
    # the tokens render the template with the parts joined by SEPARATOR, exactly
    expected = render([{"role": "system", "content": "Answer from the documents."},
                       {"role": "user", "content": SEPARATOR.join(parts)}])
    assert tokenizer.decode(p.input_ids) == expected
    assert [tokenizer.decode(p.input_ids[s:e]) for s, e in p.chunks] == parts
    action = p.kv_hints["actions"][0]["payload"]
    assert action == {"chunks": [list(c) for c in p.chunks], "policy": "query", "ratio": 0.1}
    # a document has the same tokens wherever it appears
    q = chat_chunked_prompt(_messages([DOCS[2], DOCS[0], parts[-1]]), render, encode, {})
    assert q.input_ids[slice(*q.chunks[1])] == p.input_ids[slice(*p.chunks[0])]
    assert q.input_ids[slice(*q.chunks[0])] == p.input_ids[slice(*p.chunks[2])]


@pytest.mark.parametrize("messages, msg", [
    ([{"role": "user", "content": "plain text"}], "list of non-empty"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "list of non-empty"),
    ([{"role": "user", "content": [{"type": "text", "text": ""}]}], "list of non-empty"),
    ([{"role": "system", "content": [{"type": "text", "text": "s"}]},
      {"role": "user", "content": [{"type": "text", "text": "d"}]}], "only the last user message"),
    ([], "non-empty list"),
])
def test_bad_messages_are_refused(fns, messages, msg):
    with pytest.raises(ValueError, match=msg):
        chat_chunked_prompt(messages, *fns, {})


def test_a_template_that_rewrites_content_is_refused(fns):
    _, encode = fns

    def upper(messages):
        return "".join(str(m["content"]).upper() for m in messages)

    with pytest.raises(ValueError, match="does not render each content part once"):
        chat_chunked_prompt(_messages(["a", "b"]), upper, encode, {})

    def squash(messages):
        return "".join(str(m["content"]).replace("\n\n", " ") for m in messages)

    with pytest.raises(ValueError, match="rewrites message content"):
        chat_chunked_prompt(_messages(["a", "b"]), squash, encode, {})


@pytest.mark.parametrize("raw, msg", [
    ("query", "must be an object"),
    ({"policy": "magic"}, "unknown chunk policy"),
    ({"policy": "query", "ratio": 2}, "ratio must be"),
    ({"policy": "query", "layers": 0}, "layers must be"),
    ({"chunks": [[0, 3]]}, "unknown fields"),
    ({"policy": "explicit"}, "kv_hints on /generate only"),
])
def test_bad_settings_are_refused(raw, msg):
    with pytest.raises(ValueError, match=msg):
        parse_settings(raw)
    assert parse_settings({"policy": "query", "ratio": 0.15}) == {"policy": "query", "ratio": 0.15}
