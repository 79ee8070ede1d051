"""Byte-level BPE tokenizer (GPT-4 split, nanochat's special tokens), trained and run by HF `tokenizers`.

Why HF `tokenizers`: one Rust library both trains the BPE and encodes batches in parallel, and it stores
the whole tokenizer as one tokenizer.json, plain JSON, never pickle: loading it cannot run code.
"""

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from tokenizers import Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from trainer import checkpoint_layout as layout

DEFAULT_VOCAB_SIZE = 32768
TOKENIZER_FILE = "tokenizer.json"
# Training documents are cut to their first 10,000 characters (nanochat's tok_train --doc-cap), so a few
# very long ones (code dumps, tables) cannot fill the merge statistics of a small training budget.
TRAIN_DOC_CHARS = 10_000

SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document; documents are packed back to back, so it also delimits them
    # the rest only appear in chat data (SFT), rendered by Tokenizer.render_conversation
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # assistant calls the python tool
    "<|python_end|>",
    "<|output_start|>",  # tool output fed back to the assistant
    "<|output_end|>",
]

# GPT-4's split pattern, except numbers split into runs of at most 2 digits (not 3): nanochat's choice,
# spending fewer merges on numbers at small vocab sizes.
SPLIT_PATTERN = (
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}"
    r"| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
)


class Tokenizer:
    def __init__(self, hf: HFTokenizer):
        self._hf = hf
        # "<|bos|>" written inside a document is plain text, not the special id: only special_id()
        # produces special ids, so web text cannot forge document or chat structure.
        hf.encode_special_tokens = True
        self.vocab_size: int = hf.get_vocab_size()
        self.bos_id: int = self.special_id("<|bos|>")

    def special_id(self, name: str) -> int:
        token_id = self._hf.token_to_id(name) if name in SPECIAL_TOKENS else None
        if token_id is None:
            raise KeyError(f"{name!r} is not a special token of this tokenizer; known: {SPECIAL_TOKENS}")
        return token_id

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str], prepend_bos: bool = True) -> list[list[int]]:
        """Encode many documents at once on Rust threads (encode_batch_fast skips computing offsets)."""
        prefix = [self.bos_id] if prepend_bos else []
        return [prefix + e.ids for e in self._hf.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._hf.decode(ids, skip_special_tokens=False)

    def token_bytes(self) -> list[int]:
        """UTF-8 byte length of each token id (0 for special tokens), to turn nats/token into bits/byte."""
        special = set(self._hf.get_added_tokens_decoder())
        # ByteLevel spells every byte as exactly one printable character, so characters == bytes.
        return [0 if i in special else len(self._hf.id_to_token(i)) for i in range(self.vocab_size)]

    def render_conversation(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """nanochat's chat format -> (ids, mask); mask is 1 on what the assistant says (incl. its end token).

        messages: [{"role": "system"|"user"|"assistant", "content": str}, ...], user and assistant
        alternating from a user; a leading system message is merged into the first user message.
        """
        if messages and messages[0]["role"] == "system":
            if len(messages) < 2 or messages[1]["role"] != "user":
                raise ValueError("a system message must be followed by a user message")
            merged = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
            messages = [merged, *messages[2:]]
        if not messages:
            raise ValueError("empty conversation")
        ids, mask = [self.bos_id], [0]
        for i, message in enumerate(messages):
            role = "user" if i % 2 == 0 else "assistant"
            if message["role"] != role:
                raise ValueError(f"message {i} has role {message['role']!r}, expected {role!r}")
            start, end = self.special_id(f"<|{role}_start|>"), self.special_id(f"<|{role}_end|>")
            content = self.encode(message["content"])
            ids += [start, *content, end]
            mask += [0] * (len(content) + 2) if role == "user" else [0] + [1] * (len(content) + 1)
        return ids, mask


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path) -> Tokenizer:
    """Train on texts and write out_dir/tokenizer.json atomically; vocab_size includes the special tokens."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} is below 256 byte tokens + {len(SPECIAL_TOKENS)} special")
    hf = HFTokenizer(BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            # The split above replaces ByteLevel's own (GPT-2) regex; ByteLevel only maps bytes to chars.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        min_frequency=0,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no text is ever unknown
        special_tokens=SPECIAL_TOKENS,
    )
    hf.train_from_iterator(texts, trainer)
    if hf.get_vocab_size() != vocab_size:
        raise ValueError(
            f"the training text only yields {hf.get_vocab_size()} tokens, not {vocab_size}: "
            "give more text or a smaller vocab_size"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomically(out_dir / TOKENIZER_FILE, hf.to_str())
    return Tokenizer(hf)


def _write_atomically(path: Path, text: str) -> None:
    """Temp file in the same dir, fsync, rename over: readers see the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes it 0600; other users/containers must read it
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_tokenizer(out_dir: Path) -> Tokenizer:
    path = Path(out_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}: train one first (train_tokenizer/ensure_tokenizer)")
    return Tokenizer(HFTokenizer.from_file(str(path)))


def tokenizer_sha256(out_dir: Path) -> str:
    """The tokenizer's identity, recorded in every checkpoint: same vocab size is not the same token ids."""
    return layout.sha256_file(Path(out_dir) / TOKENIZER_FILE)


def ensure_tokenizer(
    out_dir: Path, texts_factory: Callable[[], Iterable[str]], vocab_size: int = DEFAULT_VOCAB_SIZE
) -> Tokenizer:
    """Load out_dir/tokenizer.json if present (a resumed run must keep its token ids), else train one.

    texts_factory is only called when training is needed, so an existing tokenizer costs no data reads.
    """
    path = Path(out_dir) / TOKENIZER_FILE
    if not path.is_file():
        return train_tokenizer(texts_factory(), vocab_size, Path(out_dir))
    tokenizer = load_tokenizer(out_dir)
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(
            f"{path} has vocab_size {tokenizer.vocab_size}, not the requested {vocab_size}: "
            f"pass vocab_size={tokenizer.vocab_size}, or delete it to train a new one"
        )
    return tokenizer
