"""Token shards: the on-disk format between the tokenizer and the training loop.

Layout of one `.bin` shard (modelled on llm.c's):

    header   256 × int32 = 1024 bytes
             [0] MAGIC          identifies the file type
             [1] VERSION        1 = uint16 tokens, 2 = uint32 tokens
             [2] n_tokens       number of tokens that follow
             [3] vocab_size     size of the vocabulary the ids come from
             [4..255]           zero
    body     n_tokens × uint16 (vocab ≤ 65,536) or uint32

Documents are concatenated with the end-of-text token between them, so a
random window may cross a document boundary — as in GPT-2 pretraining.
Shards are read with `np.memmap`: nothing is loaded until a window is sliced.
"""

import os

import numpy as np

MAGIC = 20241121
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
VERSION_UINT16 = 1
VERSION_UINT32 = 2


class ShardError(ValueError):
    """A shard file that is missing, truncated or not a shard at all."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids 0..65,535; larger vocabularies need uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_shard(path: str, tokens, vocab_size: int) -> None:
    """Write `tokens` to `path` atomically (temp file + rename)."""
    dtype = token_dtype(vocab_size)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ShardError(f"{path}: token ids must lie in [0, {vocab_size}), got [{tokens.min()}, {tokens.max()}]")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[0] = MAGIC
    header[1] = VERSION_UINT16 if dtype == np.uint16 else VERSION_UINT32
    header[2] = tokens.size
    header[3] = vocab_size
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        np.ascontiguousarray(tokens, dtype=dtype).tofile(f)  # no copy when tokens already have the dtype
    os.replace(tmp, path)


def read_header(path: str) -> dict:
    """Parse and validate a shard's header; raise ShardError naming the file on any problem."""
    if not os.path.isfile(path):
        raise ShardError(f"{path}: shard file not found")
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: too short for a shard header ({size} < {HEADER_BYTES} bytes)")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ShardError(f"{path}: not a token shard (magic {header[0]} != {MAGIC})")
    if header[1] not in (VERSION_UINT16, VERSION_UINT32):
        raise ShardError(f"{path}: unsupported shard version {header[1]}")
    dtype = np.dtype(np.uint16) if header[1] == VERSION_UINT16 else np.dtype(np.uint32)
    n_tokens = int(header[2])
    expected = HEADER_BYTES + n_tokens * dtype.itemsize
    if size != expected:
        raise ShardError(f"{path}: truncated or corrupt shard ({size} bytes on disk, header promises {expected})")
    return {"n_tokens": n_tokens, "vocab_size": int(header[3]), "dtype": dtype}


def read_shard(path: str) -> np.ndarray:
    """Memory-map a shard's tokens (read-only) after validating its header."""
    info = read_header(path)
    if info["n_tokens"] == 0:
        return np.zeros(0, dtype=info["dtype"])
    return np.memmap(path, dtype=info["dtype"], mode="r", offset=HEADER_BYTES, shape=(info["n_tokens"],))
