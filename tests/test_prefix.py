"""Prefix reuse's rule (src/py_simkv/prefix.py), shared by Llama and Sequences."""
import numpy as np

from py_simkv.prefix import common_prefix, positions_to_keep


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix(np.array([7, 8], dtype=np.intc), [7, 8, 9]) == 2  # numpy ids compare as ints


def test_the_last_prompt_token_is_evaluated_again():
    assert positions_to_keep([1, 2, 3, 4], [1, 2, 3]) == 2   # the prompt is held whole: its last token again
    assert positions_to_keep([1, 2, 3], [1, 2, 3, 4]) == 3   # a continuation keeps everything held
    assert positions_to_keep([5], [1, 2]) == 0               # nothing shared: start over
    assert positions_to_keep([1], [1]) == 0
