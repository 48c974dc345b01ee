"""serving/grammar.py on the tiny tokenizer: masks that admit exactly the continuations of the language, completion
that leaves EOS alone, and grammars that cannot compile reported as TGI's 422 validation error."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from pydantic import TypeAdapter

from serving.grammar import Constraint, GrammarFailed, Grammars
from serving.schemas import ApiError, GrammarType
from tests.conftest import GRAMMAR_LABELS, INTENT_SCHEMA, LABEL_GRAMMAR

pytestmark = pytest.mark.unit

LABELS, LABEL_REGEX, SCHEMA = GRAMMAR_LABELS, LABEL_GRAMMAR, INTENT_SCHEMA


@pytest.fixture(scope="module")
def tokenizer(tiny_source):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_source)


@pytest.fixture(scope="module")
def grammars(tokenizer) -> Grammars:
    return Grammars(tokenizer, {tokenizer.eos_token_id}, len(tokenizer))


def compile_(grammars: Grammars, grammar: dict) -> Constraint:
    return grammars.constraint(TypeAdapter(GrammarType).validate_python(grammar))


def words(tokenizer, mask: torch.Tensor) -> dict[int, str]:
    return {i: tokenizer.decode([i]) for i in mask.nonzero()[:, 0].tolist()}


def test_the_first_mask_admits_exactly_the_tokens_that_start_a_label(tokenizer, grammars):
    allowed = words(tokenizer, compile_(grammars, LABEL_REGEX).allowed())
    every = {i: tokenizer.decode([i]) for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids}
    starts = {i for i, text in every.items() if text and any(label.startswith(text) for label in LABELS)}
    assert set(allowed) == starts
    for label in LABELS:  # the tokenizer's own spelling of each label begins with an allowed token
        assert tokenizer.encode(label, add_special_tokens=False)[0] in allowed


def test_a_complete_label_leaves_only_eos_and_a_wrong_token_is_refused(tokenizer, grammars):
    constraint = compile_(grammars, LABEL_REGEX)
    for token in tokenizer.encode("card_lost", add_special_tokens=False):
        assert constraint.allowed()[token]
        constraint.advance(token)
    assert words(tokenizer, constraint.allowed()) == {tokenizer.eos_token_id: tokenizer.eos_token}
    constraint.advance(tokenizer.eos_token_id)

    wrong = compile_(grammars, LABEL_REGEX)
    with pytest.raises(GrammarFailed):
        wrong.advance(tokenizer.encode("hello", add_special_tokens=False)[0])


@pytest.mark.parametrize(
    "grammar",
    [
        {"type": "json", "value": SCHEMA},
        {"type": "json", "value": json.dumps(SCHEMA)},  # TGI takes a schema as a string too
        {"type": "json_schema", "value": {"name": "intent", "schema": SCHEMA}},
        {"type": "json_schema", "json_schema": {"name": "intent", "schema": SCHEMA, "strict": True}},  # OpenAI's
    ],
)
def test_masked_choices_over_random_scores_always_spell_a_valid_document(tokenizer, grammars, grammar):
    """Scores that favour nothing in particular, masked, decoded greedily until EOS: every seed ends in JSON that the
    schema accepts, with at most one space between tokens."""
    for seed in range(5):
        constraint, chosen = compile_(grammars, grammar), []
        generator = torch.Generator().manual_seed(seed)
        while not chosen or chosen[-1] != tokenizer.eos_token_id:
            assert len(chosen) < 200, tokenizer.decode(chosen)
            scores = constraint.mask(torch.randn(1, len(tokenizer), generator=generator))
            chosen.append(int(scores.argmax()))
            constraint.advance(chosen[-1])
        text = tokenizer.decode(chosen[:-1])
        jsonschema.validate(json.loads(text), SCHEMA)
        assert "  " not in text and "\n" not in text


def test_json_object_admits_any_object_and_nothing_else(tokenizer, grammars):
    constraint = compile_(grammars, {"type": "json_object"})  # OpenAI's form, with no schema
    assert set(words(tokenizer, constraint.allowed()).values()) == {"{"}  # not `[`, a digit, a quote or a space
    for token in tokenizer.encode('{"card": [1, "lost", {"x": null}]}', add_special_tokens=False):
        constraint.advance(token)
    assert words(tokenizer, constraint.allowed()) == {tokenizer.eos_token_id: tokenizer.eos_token}


def test_the_tokenizer_is_built_once_per_engine(tokenizer, grammars):
    built = grammars.tokenizer
    compile_(grammars, LABEL_REGEX), compile_(grammars, {"type": "json", "value": SCHEMA})
    assert grammars.tokenizer is built


@pytest.mark.parametrize(
    ("grammar", "reason"),
    [
        ({"type": "regex", "value": "(refund|card"}, "unclosed group"),
        ({"type": "regex", "value": r"(a)\1"}, "backreferences are not supported"),
        ({"type": "regex", "value": r"[^\s\S]"}, "grammar is not valid"),  # an empty language
        ({"type": "json", "value": {"type": "nonsense"}}, "Invalid type"),
        ({"type": "json", "value": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
        ({"type": "json", "value": "{not json"}, "Expecting property name"),
        ({"type": "json", "value": [1, 2]}, "must be an object"),
        ({"type": "json_schema", "value": {"schema": 3}}, "must be an object"),
    ],
)
def test_a_grammar_that_cannot_compile_is_tgis_validation_error(grammars, grammar, reason):
    with pytest.raises(ApiError) as raised:
        compile_(grammars, grammar)
    error = raised.value
    assert (error.status, error.error_type) == (422, "validation")
    assert error.message.startswith("Input validation error: grammar is not valid: ") and reason in error.message
    assert "\n" not in error.message
