"""One worker thread per model, so concurrent requests share it without racing on it.

The encoder (its torch model and its text LRU cache) is not safe to call from many threads at once. Every
request hands its texts or images to an :class:`EncoderService` and waits on a future; the worker runs them
one model call at a time. Text requests that arrive while the model is busy are merged into one
``encode_texts`` call (one forward pass for many queries), so under load the batch size grows by itself and
no request waits for a timer: when the model is idle, a lone query runs at once.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class ServiceStats:
    text_calls: int = 0  # encoder.encode_texts calls made
    texts: int = 0  # texts asked for (before merging)
    image_calls: int = 0
    largest_batch: int = 0  # most text requests merged into one call


class EncoderService:
    def __init__(self, encoder, *, max_batch: int = 256, fast_text: bool = True):
        self.encoder = encoder
        if fast_text and hasattr(encoder, "speed_up_text"):  # a server answers many queries: worth the set-up
            encoder.speed_up_text()
        self.info = encoder.info
        self.max_batch = max_batch  # texts per merged call
        self.stats = ServiceStats()
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="cliplens-encoder", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- callers (any thread)
    def submit_texts(self, texts: list[str]) -> Future:
        return self._submit("text", list(texts))

    def submit_images(self, images: list) -> Future:
        return self._submit("image", list(images))

    def encode_texts(self, texts) -> np.ndarray:
        return self.submit_texts(texts).result()

    def encode_images(self, images) -> np.ndarray:
        return self.submit_images(images).result()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join(timeout=10)

    def _submit(self, kind: str, payload: list) -> Future:
        if self._closed:
            raise RuntimeError("the encoder service is closed")
        fut: Future = Future()
        self._queue.put((kind, payload, fut))
        return fut

    # ---------------------------------------------------------------- the worker
    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            texts, others = [job] if job[0] == "text" else [], [job] if job[0] != "text" else []
            n = len(job[1])
            stop = False
            while n < self.max_batch:  # take whatever else is already waiting, without waiting for more
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                (texts if nxt[0] == "text" else others).append(nxt)
                n += len(nxt[1]) if nxt[0] == "text" else 0
            if texts:
                self._run_texts(texts)
            for kind, images, fut in others:
                self._finish([fut], lambda images=images: [self.encoder.encode_images(images)])
                self.stats.image_calls += 1
            if stop:
                return

    def _run_texts(self, jobs: list) -> None:
        merged = list(dict.fromkeys(t for _, texts, _ in jobs for t in texts))
        self.stats.text_calls += 1
        self.stats.texts += sum(len(t) for _, t, _ in jobs)
        self.stats.largest_batch = max(self.stats.largest_batch, len(jobs))

        def compute():
            vecs = self.encoder.encode_texts(merged)
            row = {t: i for i, t in enumerate(merged)}
            return [vecs[[row[t] for t in texts]] for _, texts, _ in jobs]

        self._finish([fut for *_, fut in jobs], compute)

    @staticmethod
    def _finish(futures: list[Future], compute) -> None:
        try:
            results = compute()
        except Exception as exc:  # hand the error to every waiting request; the worker lives on
            for fut in futures:
                fut.set_exception(exc)
            return
        for fut, res in zip(futures, results):
            fut.set_result(res)
