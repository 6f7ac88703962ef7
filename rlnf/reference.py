"""The frozen reference policy's log-probs for the KL penalty: computed per batch, or served from a
per-utterance cache (the reference is frozen and deterministic, so from the second epoch on its
forward can be skipped, as TRL's ``precompute_ref_log_probs``)."""

from __future__ import annotations

import collections
import logging
from typing import Sequence

import numpy as np
import torch

from rlnf.data.loader import AudioBatch
from rlnf.errors import DataError
from rlnf.policy import CTCPolicy, batch_dependence

log = logging.getLogger(__name__)


class ReferenceCache:
    """The frozen reference's log-probs per utterance (its valid frames only, float32, on the CPU),
    least recently used first out beyond ``max_bytes``.

    The reference runs in eval mode on the same audio every time it meets an utterance, so from the
    second epoch on its forward can be skipped (as TRL's ``precompute_ref_log_probs``). That needs a
    clip's outputs not to depend on the rest of its batch beyond float rounding (masked convolutions,
    attention with padding masks): ``checked_reference_cache`` measures it before making one."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: collections.OrderedDict[object, torch.Tensor] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: object, frames: int) -> torch.Tensor | None:
        """The entry for ``key`` if it holds ``frames`` frames. An entry of another length means the
        audio changed on disk since it was cached: it is dropped (a miss), with a warning."""
        entry = self._entries.get(key)
        if entry is not None and entry.shape[0] != frames:
            log.warning("%s: the reference's cached log-probs have %d frames but the audio now gives %d (the file "
                        "changed during the run); recomputing them", key, entry.shape[0], frames)
            self._entries.pop(key)
            self.bytes -= entry.numel() * entry.element_size()
            entry = None
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: object, log_probs: torch.Tensor) -> None:
        size = log_probs.numel() * log_probs.element_size()
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.numel() * old.element_size()
        while self._entries and self.bytes + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.numel() * evicted.element_size()
        self._entries[key] = log_probs
        self.bytes += size


# Largest batch dependence (nats, ``batch_dependence``) the reference cache accepts: float32 rounding
# of the supported families is ~1e-6 (docs/model-families.md); a forward whose padding leaks into a
# clip's output (an unmasked convolution or pooling) differs by orders of magnitude more.
CACHE_TOLERANCE = 1e-3


def checked_reference_cache(reference: CTCPolicy, dataset, max_bytes: int, clips: int = 2) -> ReferenceCache | None:
    """A ``ReferenceCache`` of ``max_bytes`` when the reference's log-probs of a clip do not depend on the
    rest of its batch, measured with ``batch_dependence`` on the first ``clips`` readable items of
    ``dataset`` (an ``AudioDataset``); None, with a warning, when they do (the cache would serve a
    clip's log-probs from another batch's padding)."""
    audio = []
    for index in range(min(len(dataset), 32 * clips)):  # a few readable clips; the rest is training's
        try:
            item = dataset[index]
        except DataError:  # a bad clip is reported when training reaches it, with a checkpoint
            continue
        if item is not None:
            audio.append(torch.from_numpy(item[0]))
        if len(audio) == clips:
            break
    if not audio:
        return ReferenceCache(max_bytes)
    difference = batch_dependence(reference, audio)
    log.info("reference log-probs' batch dependence: %.2e nats (cache tolerance %.0e)", difference, CACHE_TOLERANCE)
    if difference > CACHE_TOLERANCE:
        log.warning("the reference's log-probs of a clip depend on the rest of its batch (largest difference %.3g "
                    "nats > %g, e.g. padding reaching an unmasked layer): the reference cache is off and the "
                    "reference runs every step (algorithm.reference_cache_mb=0 silences this)",
                    difference, CACHE_TOLERANCE)
        return None
    return ReferenceCache(max_bytes)


def reference_log_probs(reference: CTCPolicy, batch: AudioBatch, encoded_len: torch.Tensor, frames: int,
                        autocast, cache: ReferenceCache | None = None,
                        keys: Sequence[object] | None = None) -> torch.Tensor:
    """The reference's log-probs at tau = 1, [B, frames, V] float32 (frames past an utterance's
    ``encoded_len`` hold log(1/V) and are never read). With a cache, only the utterances it lacks go
    through the reference, as one smaller batch; their outputs are stored under ``keys``."""
    cached = [None] * len(batch) if cache is None else [
        cache.get(key, length) for key, length in zip(keys, encoded_len.tolist())]
    missing = [b for b, entry in enumerate(cached) if entry is None]
    if missing:
        sub = batch if len(missing) == len(batch) else batch.subset(missing)
        with torch.no_grad(), autocast():
            computed, computed_len = reference.forward(sub.audio, sub.audio_len)
        expected = encoded_len[torch.tensor(missing, device=encoded_len.device)]
        if not torch.equal(computed_len.to(expected.device), expected):
            raise RuntimeError(f"reference and policy disagree on frame counts ({computed_len.tolist()} vs "
                               f"{expected.tolist()}): different front ends?")
        computed = computed.float()
        for row, (b, length) in enumerate(zip(missing, expected.tolist())):
            cached[b] = computed[row, :length]  # a view
            if cache is not None:
                cache.put(keys[b], cached[b].detach().to("cpu", copy=True))
        if len(missing) == len(batch) and computed.shape[1] == frames:
            return computed  # the whole batch in one forward: already the right shape
    vocabulary = cached[0].shape[-1]
    out = torch.full((len(batch), frames, vocabulary), -float(np.log(vocabulary)), device=encoded_len.device)
    for b, entry in enumerate(cached):
        out[b, : entry.shape[0]] = entry.to(out.device, non_blocking=True)
    return out
