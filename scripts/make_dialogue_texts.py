"""Write the dialogue texts of the calibration set and of the quality evaluation from chatterbot-corpus.

chatterbot-corpus 1.3.3 (BSD-3-Clause, Gunther Cox) holds hand-written English conversations by topic.
Each conversation becomes alternating "A: ..." / "B: ..." lines, conversations separated by a blank line.
Repeated conversations are written once (tech_support repeats 10 conversations 1,050 times). The categories
are split so that the evaluation's dialogue is held out from calibration (about 19.5K and 12.4K tokens):

    pip install chatterbot-corpus==1.3.3 pyyaml
    python scripts/make_dialogue_texts.py
"""
import os
import sys

import yaml

CALIBRATION = ("ai", "botprofile", "coding", "computers", "conversations", "emotion", "food", "gossip",
               "greetings", "health", "history", "tech_support")
HELD_OUT = ("humor", "literature", "money", "movies", "politics", "psychology", "science", "sports", "trivia")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def render(folder: str, categories, seen: set) -> str:
    parts = []
    for name in categories:
        with open(os.path.join(folder, name + ".yml"), encoding="utf-8") as f:
            for conv in yaml.safe_load(f).get("conversations", []):
                key = tuple(str(u) for u in conv)
                if key in seen:
                    continue
                seen.add(key)
                parts.append("\n".join(f"{'AB'[i % 2]}: {str(u).strip()}" for i, u in enumerate(conv)))
    return "\n\n".join(parts) + "\n"


def main() -> None:
    import chatterbot_corpus

    folder = os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data", "english")
    seen = set()  # across both files: no conversation is in calibration and held out
    for categories, out in ((CALIBRATION, "src/py_simkv/calibration/dialogue_chatterbot.txt"),
                            (HELD_OUT, "benchmarks/heldout/dialogue_chatterbot_heldout.txt")):
        with open(os.path.join(ROOT, out), "w", encoding="utf-8") as f:
            f.write(render(folder, categories, seen))
        print("wrote", out, file=sys.stderr)


if __name__ == "__main__":
    main()
