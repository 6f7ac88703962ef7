"""Batches of audio for the recipes: length-bucketed, seeded, resumable.

``bucketed_batches`` is a pure function of (durations, seed, epoch), so a resumed run rebuilds
the same epoch and skips the batches it already consumed: the data position is (epoch, batch).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from rlnf.data.audio import decode_audio
from rlnf.data.manifest import Utterance, durations_of
from rlnf.errors import DataError, RlnfError

log = logging.getLogger(__name__)


@dataclass
class AudioBatch:
    """A padded batch. audio [B, S] float32, audio_len [B] int64 (samples)."""

    audio: torch.Tensor
    audio_len: torch.Tensor
    utterances: list[Utterance]

    @property
    def references(self) -> list[str | None]:
        return [u.text for u in self.utterances]

    def to(self, device: torch.device) -> "AudioBatch":
        non_blocking = device.type == "cuda"
        return AudioBatch(self.audio.to(device, non_blocking=non_blocking),
                          self.audio_len.to(device, non_blocking=non_blocking), self.utterances)

    def __len__(self) -> int:
        return len(self.utterances)

    def subset(self, rows: Sequence[int]) -> "AudioBatch":
        """The utterances ``rows`` as a batch of their own, padded to the longest of them."""
        index = torch.tensor(list(rows), device=self.audio.device)
        audio_len = self.audio_len[index]
        return AudioBatch(self.audio[index, : int(audio_len.max())], audio_len, [self.utterances[b] for b in rows])


def bucketed_batches(
    durations: Sequence[float],
    batch_size: int,
    bucket_size: int = 16,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
) -> list[list[int]]:
    """Split indices into batches of similar duration.

    Indices are shuffled (seeded by ``seed`` and ``epoch``), cut into buckets of
    ``batch_size * bucket_size``, each bucket is sorted by duration and cut into batches, and the
    batch order is shuffled. The last batch may be smaller.
    """
    durations = np.asarray(durations, dtype=np.float64)
    count = len(durations)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(count) if shuffle else np.arange(count)
    chunk = batch_size * bucket_size
    batches: list[list[int]] = []
    for start in range(0, count, chunk):
        bucket = order[start:start + chunk]
        if bucket_size > 1:
            bucket = bucket[np.argsort(durations[bucket], kind="stable")]
        batches.extend(bucket[i:i + batch_size].tolist() for i in range(0, len(bucket), batch_size))
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


class AudioDataset(torch.utils.data.Dataset):
    """Loads utterances as mono float32 at ``sample_rate``. Bad audio -> DataError naming
    ``manifest:line``, or None (skip). Every clip's header is checked before it is decoded (missing,
    empty, cut off), as full validation does at start-up: this is the check of ``data.validate=lazy``,
    and it catches a clip changed after a cached validation."""

    def __init__(self, utterances: Sequence[Utterance], sample_rate: int, skip_bad: bool = False):
        self.utterances = utterances
        self.sample_rate = sample_rate
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int) -> tuple[np.ndarray, Utterance] | None:
        from rlnf.data.audio import open_clip
        from rlnf.data.clips import header_info

        utterance = self.utterances[index]
        try:
            file, source, segment = open_clip(utterance.audio_filepath)  # a tar member is read once, for both steps
            frames, rate = header_info(source, file)
            if segment is not None:
                segment.frames(frames, rate, file)
            return decode_audio(source, self.sample_rate, file, segment), utterance
        except DataError as exc:
            if self.skip_bad:
                log.warning("skipping %s: %s", utterance.where, exc)
                return None
            raise DataError(f"{utterance.where}: {exc}") from None


def collate(items: list[tuple[np.ndarray, Utterance] | None]) -> AudioBatch | None:
    """Pad waveforms to the longest in the batch. Skipped items (None) are dropped."""
    items = [item for item in items if item is not None]
    if not items:
        return None
    lengths = torch.tensor([len(audio) for audio, _ in items], dtype=torch.long)
    audio = torch.zeros(len(items), int(lengths.max()), dtype=torch.float32)
    for row, (samples, _) in enumerate(items):
        audio[row, :len(samples)] = torch.from_numpy(samples)
    return AudioBatch(audio=audio, audio_len=lengths, utterances=[u for _, u in items])


class TrainStream:
    """Endless stream of training batches, epoch after epoch, positioned by (epoch, batch).

    In a run of ``world_size`` processes every process computes the same global batches of
    ``batch_size * world_size`` utterances and loads only its contiguous shard of each
    (``rlnf.distributed.shard_bounds``; shard sizes differ by at most one). Global batches smaller
    than the number of processes (an epoch's tail) are left out, so every process has work. A
    shard whose audio is all unreadable (``skip_bad``) is yielded as ``None`` so the processes
    can agree to skip that step together; a single process just moves on.
    """

    def __init__(self, dataset: AudioDataset, batch_size: int, bucket_size: int, shuffle: bool, seed: int,
                 num_workers: int = 0, pin_memory: bool = False, rank: int = 0, world_size: int = 1):
        self.dataset = dataset
        self.batch_size = batch_size
        self.bucket_size = bucket_size
        self.shuffle = shuffle
        self.seed = seed
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.batch_in_epoch = 0
        self.skipped = 0  # batches with no readable clip
        self.skipped_clips = 0  # unreadable clips left out (skip_bad on)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "skipped": self.skipped,
                "skipped_clips": self.skipped_clips}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.skipped = state.get("skipped", 0)
        self.skipped_clips = state.get("skipped_clips", 0)

    def _epoch_batches(self) -> list[list[int]]:
        from rlnf.distributed import shard_bounds

        durations = durations_of(self.dataset.utterances)
        batches = bucketed_batches(durations, self.batch_size * self.world_size, self.bucket_size, self.shuffle,
                                   self.seed, self.epoch)
        if self.world_size == 1:
            return batches
        batches = [batch for batch in batches if len(batch) >= self.world_size]
        if not batches:
            raise DataError(f"{len(durations)} training utterances cannot feed {self.world_size} processes")
        return [batch[slice(*shard_bounds(len(batch), self.rank, self.world_size))] for batch in batches]

    def __iter__(self) -> Iterator[AudioBatch | None]:
        while True:
            batches = self._epoch_batches()[self.batch_in_epoch:]
            loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, collate_fn=collate,
                                                 num_workers=self.num_workers, pin_memory=self.pin_memory)
            for indices, batch in zip(batches, from_workers(loader)):
                self.batch_in_epoch += 1
                self.skipped_clips += len(indices) - (0 if batch is None else len(batch))
                if batch is None:  # every utterance of the batch was unreadable and skip_bad is on
                    self.skipped += 1
                    if self.world_size > 1:
                        yield None
                    continue
                yield batch
            self.epoch += 1
            self.batch_in_epoch = 0


def from_workers(loader: Iterable) -> Iterator:
    """The batches of a DataLoader. A worker process's DataError comes back as PyTorch re-raises it,
    with the worker's whole traceback pasted into its message; it is raised again with the
    original message alone (file and manifest line), as in a single process."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except RlnfError as exc:
            lines = str(exc).strip().splitlines()
            if len(lines) > 1 and lines[1].startswith("Original Traceback"):
                raise type(exc)(lines[-1].split(": ", 1)[-1]) from None
            raise
        yield batch


def eval_batches(dataset: AudioDataset, batch_size: int, num_workers: int = 0) -> Iterator[AudioBatch]:
    """Validation batches in a fixed, duration-sorted order (no shuffling)."""
    durations = durations_of(dataset.utterances)
    batches = bucketed_batches(durations, batch_size, bucket_size=max(1, len(durations)), shuffle=False)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                         num_workers=num_workers)
    for batch in from_workers(loader):
        if batch is not None:
            yield batch
