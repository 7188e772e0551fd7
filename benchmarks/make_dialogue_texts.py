"""Write the dialogue texts of the calibration set and of the quality evaluation from chatterbot-corpus.

chatterbot-corpus 1.3.3 (BSD-3-Clause, Gunther Cox) holds hand-written English conversations by topic.
Each conversation becomes alternating "A: ..." / "B: ..." lines, conversations separated by a blank line.
Its categories are split so that the evaluation's dialogue is held out from calibration:

    pip install chatterbot-corpus==1.3.3 pyyaml
    python benchmarks/make_dialogue_texts.py
"""
import os
import sys

import yaml

CALIBRATION = ("ai", "botprofile", "coding", "computers", "conversations", "emotion", "food", "gossip",
               "greetings", "health", "history", "humor", "literature")
HELD_OUT = ("money", "movies", "politics", "psychology", "science", "sports", "tech_support", "trivia")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def render(folder: str, categories) -> str:
    parts = []
    for name in categories:
        with open(os.path.join(folder, name + ".yml"), encoding="utf-8") as f:
            for conv in yaml.safe_load(f).get("conversations", []):
                parts.append("\n".join(f"{'AB'[i % 2]}: {str(u).strip()}" for i, u in enumerate(conv)))
    return "\n\n".join(parts) + "\n"


def main() -> None:
    import chatterbot_corpus

    folder = os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data", "english")
    for categories, out in ((CALIBRATION, "py_simkv/calibration/dialogue_chatterbot.txt"),
                            (HELD_OUT, "benchmarks/heldout/dialogue_chatterbot_heldout.txt")):
        with open(os.path.join(ROOT, out), "w", encoding="utf-8") as f:
            f.write(render(folder, categories))
        print("wrote", out, file=sys.stderr)


if __name__ == "__main__":
    main()
