"""merv.decoding, the one implementation of sampling settings, stop strings and option-letter continuations that
merv eval, merv serve and lmms-eval share."""

from __future__ import annotations

import pytest

from merv.decoding import GREEDY, cut_at_stop, letter_continuations, sampling_kwargs, visible_text
from merv.prompting import PromptBuilder
from tests.test_prompting import CHATML


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((0.0, True, 0.9, 5), GREEDY),  # temperature 0 is greedy whatever do_sample says
        ((None, None, 0.9, None), GREEDY),  # nothing asked: greedy, top_p unused
        ((0.7, None, 0.9, 0), {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0}),  # merv serve
        ((0.7, False, 0.9, None), GREEDY),  # lmms-eval's do_sample: false wins over a temperature
        ((None, True, None, 3), {"do_sample": True, "top_k": 3}),  # transformers' own temperature
    ],
)
def test_sampling_kwargs(args, expected):
    assert sampling_kwargs(*args) == expected


def test_cut_at_stop_is_what_serve_shows_at_the_end():
    text = "  The answer is B.\nUSER: next ###"
    for stop in ((), ("###",), ("\n", "###"), ("###", "\n")):
        assert cut_at_stop(text, stop) == visible_text(text, stop, final=True)[0]
    assert cut_at_stop(text, ("###", "\n")) == "The answer is B."  # the earliest stop string, not the first listed
    assert cut_at_stop(text, ()) == text.strip()


def test_letter_continuations_start_the_answer_as_the_format_writes_it():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    assert letter_continuations(lambda: PromptBuilder("vicuna"), "Q?", 3) == [" A", " B", " C"]
    assert letter_continuations(lambda: PromptBuilder("base"), "Q?", 2) == [" A", " B"]
    # a transformers tokenizer rendering a ChatML template (the vocabulary plays no part)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    tok.chat_template = CHATML
    # a chat template writes end-of-turn text after the answer: cut after the letter
    assert letter_continuations(lambda: PromptBuilder("chat-template", tok), "Q?", 2) == ["A", "B"]
