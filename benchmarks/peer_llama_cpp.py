"""llama.cpp's side of bench_peer.py, in a process of its own: torch's and llama.cpp's thread pools each spin
on the cores for a while after their work, so in one process each slows the other down.

    python benchmarks/peer_llama_cpp.py MODEL.gguf IDS.json --batches 1 4 --tokens 32 --threads 2

Prints one JSON object: {batch: [prefill seconds, decode seconds]} for the prompt's token ids in IDS.json.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time

import llama_cpp as lib
import numpy as np


class LlamaCpp:
    """llama.cpp through llama-cpp-python's low-level API: one context with `sequences` sequences (the batch
    API llama.cpp's own server uses for parallel slots; llama-cpp-python's server runs one at a time)."""

    def __init__(self, path: str, threads: int, sequences: int, context: int):
        lib.llama_backend_init()
        self.model = lib.llama_model_load_from_file(path.encode(), lib.llama_model_default_params())
        params = lib.llama_context_default_params()
        params.n_ctx = context * sequences
        params.n_batch = params.n_ubatch = min(context * sequences, 4096)
        params.n_seq_max = sequences
        params.n_threads = params.n_threads_batch = threads
        self.ctx = lib.llama_init_from_model(self.model, params)
        self.vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.batch = lib.llama_batch_init(params.n_batch, 0, sequences)
        self.n_batch = params.n_batch

    def close(self) -> None:
        lib.llama_batch_free(self.batch)
        lib.llama_free(self.ctx)
        lib.llama_model_free(self.model)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> list[int]:
        """Feed (token, position, sequence, wants logits) items, in calls of at most n_batch; returns the
        greedy next token of each item that wanted logits."""
        chosen = []
        for start in range(0, len(items), self.n_batch):
            part = items[start : start + self.n_batch]
            batch = self.batch
            batch.n_tokens = len(part)
            for i, (token, position, sequence, logits) in enumerate(part):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, position, 1
                batch.seq_id[i][0] = sequence
                batch.logits[i] = logits
            if lib.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            for i, item in enumerate(part):
                if item[3]:
                    pointer = ctypes.cast(
                        lib.llama_get_logits_ith(self.ctx, i), ctypes.POINTER(ctypes.c_float)
                    )
                    chosen.append(int(np.ctypeslib.as_array(pointer, (self.vocab,)).argmax()))
        return chosen

    def run(self, ids: list[int], rows: int, steps: int) -> tuple[float, float]:
        """(prefill seconds, decode seconds) of `steps` greedy tokens for `rows` sequences of `ids`."""
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        items = [(t, p, s, p == len(ids) - 1) for s in range(rows) for p, t in enumerate(ids)]
        started = time.perf_counter()
        tokens = self._decode(items)
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        for step in range(steps):
            tokens = self._decode([(tokens[s], len(ids) + step, s, True) for s in range(rows)])
        return prefill, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("ids")
    parser.add_argument("--batches", type=int, nargs="+", required=True)
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args()
    with open(args.ids) as f:
        ids = json.load(f)
    engine = LlamaCpp(args.model, args.threads, max(args.batches), len(ids) + args.tokens + 8)
    try:
        print(json.dumps({rows: engine.run(ids, rows, args.tokens) for rows in args.batches}))
    finally:
        engine.close()


if __name__ == "__main__":
    main()
