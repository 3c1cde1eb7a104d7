"""``lasp2 prepare``: text files -> a token file for ``lasp2 train --task tokens``.

Byte-level by default (ids 0..255, end-of-document 257: the vocabulary of ``--task text``), or
with ``--tokenizer tokenizer.json``, a local file read by the ``tokenizers`` library (nothing is
downloaded). Documents are split as ``--task text`` splits them (``--doc-sep``) and each ends with
the end-of-document id: ``--eos-token`` if given, else the first of ``EOS_CANDIDATES`` the
tokenizer knows, else one new id after its vocabulary. Writes ``--out`` (.bin raw, as nanoGPT, or
.npy) and its sidecar ``OUT.json`` (see ``lasp2.train.tokens``).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterator, List, Optional

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "[SEP]")
ENCODE_BATCH = 1024  # documents per tokenizers.encode_batch call


def add_parser(subparsers) -> None:
    from .config import DOC_SEPS

    p = subparsers.add_parser(
        "prepare", help="tokenize text files into a memory-mapped token file for lasp2 train --task tokens",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  lasp2 prepare book.txt --out book.bin && lasp2 train --task tokens --data book.bin\n"
               "  lasp2 prepare corpus/*.txt --tokenizer tokenizer.json --out corpus.bin")
    p.add_argument("inputs", nargs="+", type=Path, metavar="TEXT", help="UTF-8 text files")
    p.add_argument("--out", required=True, help="token file to write (.bin or .npy)")
    p.add_argument("--tokenizer", type=Path, help="a local tokenizer.json (tokenizers library); default: bytes")
    p.add_argument("--eos-token", help="the end-of-document token of the tokenizer (default: see above)")
    p.add_argument("--doc-sep", choices=DOC_SEPS, default="blank-line",
                   help="documents are separated by blank lines, are single lines, or each file is one")
    p.set_defaults(func=run)


def _documents(inputs: List[Path], doc_sep: str) -> Iterator[bytes]:
    from .data import split_documents

    for path in inputs:
        if not path.is_file():
            raise ValueError(f"{path} is not a readable file")
        yield from split_documents(path.read_bytes(), doc_sep)


def prepare(inputs: List[Path], out: str, *, tokenizer: Optional[Path] = None, eos_token: Optional[str] = None,
            doc_sep: str = "blank-line"):
    """Tokenize ``inputs`` into ``out``; returns its ``TokenFileInfo``."""
    import numpy as np

    from .data import EOS_ID, TEXT_VOCAB
    from .tokens import write_tokens

    pieces = []
    if tokenizer is None:
        if eos_token is not None:
            raise ValueError("--eos-token needs --tokenizer (byte-level files end documents with id 257)")
        for doc in _documents(inputs, doc_sep):
            pieces += [np.frombuffer(doc, dtype=np.uint8), np.array([EOS_ID])]
        vocab, eos, name = TEXT_VOCAB, EOS_ID, "bytes"
    else:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ValueError("--tokenizer needs the tokenizers library: pip install 'lasp2[data]'") from None
        if not tokenizer.is_file():
            raise ValueError(f"--tokenizer {tokenizer} is not a readable file (a local tokenizer.json)")
        tok = Tokenizer.from_file(str(tokenizer))
        vocab = tok.get_vocab_size(with_added_tokens=True)
        if eos_token is not None:
            eos = tok.token_to_id(eos_token)
            if eos is None:
                raise ValueError(f"--eos-token {eos_token!r} is not a token of {tokenizer}")
        else:
            eos = next((tok.token_to_id(t) for t in EOS_CANDIDATES if tok.token_to_id(t) is not None), None)
            if eos is None:  # a new id after the tokenizer's own
                eos, vocab = vocab, vocab + 1
        docs = list(_documents(inputs, doc_sep))
        for i in range(0, len(docs), ENCODE_BATCH):
            texts = [d.decode("utf-8", errors="replace") for d in docs[i:i + ENCODE_BATCH]]
            for enc in tok.encode_batch(texts, add_special_tokens=False):
                pieces += [np.asarray(enc.ids), np.array([eos])]
        name = str(tokenizer)
    if not pieces:
        raise ValueError("the inputs hold no text (no non-empty document)")
    return write_tokens(out, pieces, vocab_size=vocab, eos_id=eos, tokenizer=name,
                        sources=[str(p) for p in inputs])


def run(args) -> int:
    from ..cli import UsageError

    try:
        info = prepare(args.inputs, args.out, tokenizer=args.tokenizer, eos_token=args.eos_token,
                       doc_sep=args.doc_sep)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(f"wrote {info.path}: {info.n_tokens:,} tokens ({info.dtype}), vocabulary {info.vocab_size}, "
          f"end-of-document id {info.eos_id}; train on it with: lasp2 train --task tokens --data {info.path}")
    return 0
