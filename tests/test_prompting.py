"""apb_jax.prompting on offline Llama-3-style and Qwen2.5-style BPE tokenizers: the rendered ids are the chat
template's, the document/query split loses and duplicates nothing, raw mode, stop tokens, and the errors."""

import numpy as np
import pytest

from apb_jax.prompting import DEFAULT_CHAT_FORMAT, PromptRenderer, render
from tests.tokenizer_fixtures import FLAVORS, QWEN_DEFAULT_SYSTEM, build_bpe_tokenizer, load

CONTEXT = "The grass is green. The pass key is 71432. Remember it.\nThe sky is blue. There and back again."
QUESTION = "What is the pass key?"


@pytest.fixture(scope="module", params=FLAVORS)
def tok(request, tmp_path_factory):
    return load(build_bpe_tokenizer(tmp_path_factory.mktemp(request.param), request.param))


def _template_ids(tok, user, system=None):
    msgs = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": user}]
    out = tok.apply_chat_template(msgs, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _is_llama(tok):
    return "<|eot_id|>" in tok.get_added_vocab()


@pytest.mark.parametrize("system", [None, "Answer briefly."])
def test_ids_equal_apply_chat_template_and_split_is_lossless(tok, system):
    p = render(tok, CONTEXT, QUESTION, system_prompt=system)
    want = _template_ids(tok, DEFAULT_CHAT_FORMAT.format(context=CONTEXT, question=QUESTION), system)
    assert p.chat_template
    assert list(p.doc_ids) + list(p.query_ids) == want  # nothing lost, nothing repeated
    assert p.doc_ids.dtype == np.int32 and not p.doc_ids.flags.writeable
    doc, query = tok.decode(p.doc_ids), tok.decode(p.query_ids)
    assert doc.endswith(CONTEXT + "\n\n") and query.startswith(QUESTION)
    assert doc + query == p.text
    if _is_llama(tok):  # the template's own BOS, once; the header of the answer turn is in the query
        assert p.doc_ids[0] == tok.bos_token_id and list(p.ids).count(tok.bos_token_id) == 1
        assert query.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    else:
        assert (QWEN_DEFAULT_SYSTEM in doc) == (system is None)
        assert query.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_merge_across_the_cut_goes_to_the_query(tok):
    """With "{context} {question}" BPE merges the space into the question's first word: the cut moves before it."""
    p = render(tok, CONTEXT, QUESTION, prompt_format="Context: {context} {question}")
    full = list(tok(p.text, add_special_tokens=False)["input_ids"])
    cut = p.text.index(QUESTION)
    naive = (
        tok(p.text[:cut], add_special_tokens=False)["input_ids"]
        + tok(p.text[cut:], add_special_tokens=False)["input_ids"]
    )
    assert naive != full  # the case is real: tokenizing the two halves apart would change the ids
    assert list(p.ids) == full
    assert tok.decode(p.query_ids).startswith(" " + QUESTION)


def test_answer_prefix_follows_the_generation_prompt(tok):
    p = render(tok, CONTEXT, QUESTION, answer_prefix=" The pass key is")
    base = _template_ids(tok, DEFAULT_CHAT_FORMAT.format(context=CONTEXT, question=QUESTION))
    assert list(p.ids[: len(base)]) == base
    assert tok.decode(p.ids[len(base) :]) == "The pass key is"  # leading space dropped: it opens the turn
    raw = render(tok, CONTEXT, QUESTION, answer_prefix=" The pass key is", chat_template=False)
    assert tok.decode(raw.query_ids) == QUESTION + " The pass key is"


def test_raw_mode_is_the_plain_tokenization(tok):
    p = render(tok, CONTEXT, QUESTION, chat_template=False)
    assert not p.chat_template
    assert list(p.doc_ids) == list(tok(CONTEXT)["input_ids"])  # with the tokenizer's special tokens
    assert list(p.query_ids) == list(tok(QUESTION, add_special_tokens=False)["input_ids"])
    assert (p.doc_ids[0] == tok.bos_token_id) == _is_llama(tok)
    assert p.stop_token_ids == (tok.eos_token_id,)


def test_stop_tokens(tok):
    p = render(tok, CONTEXT, QUESTION)
    added = tok.get_added_vocab()
    if _is_llama(tok):
        want = {added["<|eot_id|>"], added["<|end_of_text|>"], added["<|eom_id|>"]}
    else:
        want = {added["<|im_end|>"], added["<|endoftext|>"]}
    assert set(p.stop_token_ids) == want and tok.eos_token_id in want
    assert 7 in render(tok, CONTEXT, QUESTION, extra_stop_token_ids=[7]).stop_token_ids


def test_renderer_count_matches_render(tok):
    r = PromptRenderer(tok, system_prompt="Be brief.")
    for chat in (True, False):
        r2 = PromptRenderer(tok, chat_template=chat)
        assert r2.count(CONTEXT, QUESTION, " Answer:") == len(r2.render(CONTEXT, QUESTION, " Answer:"))
    assert r.count(CONTEXT, QUESTION) == len(r.render(CONTEXT, QUESTION))


def test_errors(tok, tmp_path):
    with pytest.raises(ValueError, match="context tokenizes to no tokens"):
        render(tok, "", QUESTION)
    with pytest.raises(ValueError, match="question tokenizes to no tokens"):
        render(tok, CONTEXT, "")
    n = len(render(tok, CONTEXT, QUESTION))
    with pytest.raises(ValueError, match=rf"is {n} tokens .* \+ 5 to generate = {n + 5}, .* max positions {n}"):
        render(tok, CONTEXT, QUESTION, max_positions=n, max_new_tokens=5)
    assert len(render(tok, CONTEXT, QUESTION, max_positions=n)) == n
    with pytest.raises(ValueError, match=r"\{question\} exactly once"):
        render(tok, CONTEXT, QUESTION, prompt_format="{context} only")
    with pytest.raises(ValueError, match="before"):
        render(tok, CONTEXT, QUESTION, prompt_format="{question} {context}")
    saved = tok.chat_template
    try:
        tok.chat_template = "{% for m in messages %}{{ m['content'] }{% endfor %}"  # a syntax error
        with pytest.raises(ValueError, match="chat template failed to render: TemplateSyntaxError"):
            render(tok, CONTEXT, QUESTION)
        tok.chat_template = "{{ raise_exception('no user turns here') }}"
        with pytest.raises(ValueError, match=r"failed to render: .*no user turns here"):
            render(tok, CONTEXT, QUESTION)
        tok.chat_template = None
        assert not render(tok, CONTEXT, QUESTION).chat_template  # auto: raw without a template
        with pytest.raises(ValueError, match="has no chat template"):
            render(tok, CONTEXT, QUESTION, chat_template=True)
    finally:
        tok.chat_template = saved
