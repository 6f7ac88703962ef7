"""The CTC policy: a NeMo CTC model (characters or BPE) seen as a distribution over transcripts.

One encoder pass per batch gives per-frame log-probs [B, T, V]; K hypotheses per utterance are
sampled from them (``rlnf.ctc``), never by re-running the encoder on K copies of the audio.

Modes (see ``set_mode``): rollouts always run with dropout, SpecAugment and dither off and
BatchNorm on running statistics; the update does the same by default (``batchnorm: frozen``),
so the log-probs of the rollout, the update and the reference are comparable.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from rlnf import ctc
from rlnf.errors import CheckpointError, DataError
from rlnf.metrics import normalize_text

log = logging.getLogger(__name__)


@dataclass
class Samples:
    """K hypotheses per utterance drawn from one set of log-probs.

    labels [B, K, L], label_len [B, K], texts [B][K].
    """

    labels: torch.Tensor
    label_len: torch.Tensor
    texts: list[list[str]]

    def with_rows(self, rows: Sequence[int], other: "Samples") -> "Samples":
        """These samples with utterances ``rows`` replaced by ``other``'s (one row of ``other`` per
        entry of ``rows``, same K); labels are re-padded to the longer of the two."""
        length = max(self.labels.shape[2], other.labels.shape[2])
        labels = torch.nn.functional.pad(self.labels, (0, length - self.labels.shape[2]))
        labels[list(rows)] = torch.nn.functional.pad(other.labels, (0, length - other.labels.shape[2]))
        label_len = self.label_len.clone()
        label_len[list(rows)] = other.label_len
        texts = list(self.texts)
        for row, group in zip(rows, other.texts):
            texts[row] = group
        return Samples(labels=labels, label_len=label_len, texts=texts)

    def select(self, rows: Sequence[int]) -> "Samples":
        """The hypotheses of utterances ``rows`` only."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.labels.device)
        return Samples(labels=self.labels[index], label_len=self.label_len[index], texts=[self.texts[b] for b in rows])

    def concat(self, other: "Samples") -> "Samples":
        """Each utterance's hypotheses followed by ``other``'s: K1 + K2 per utterance."""
        length = max(self.labels.shape[2], other.labels.shape[2])
        pad = torch.nn.functional.pad
        labels = torch.cat([pad(self.labels, (0, length - self.labels.shape[2])),
                            pad(other.labels, (0, length - other.labels.shape[2]))], dim=1)
        return Samples(labels=labels, label_len=torch.cat([self.label_len, other.label_len], dim=1),
                       texts=[mine + theirs for mine, theirs in zip(self.texts, other.texts)])


ADAPTER_NAME = "rlnf"  # the adapters policy.adapters adds, in every encoder layer


def adapter_ready_config(config):
    """A restored model's config with its encoder swapped for NeMo's adapter-taking subclass of it
    (``ConformerEncoderAdapter``, ``ConvASREncoderAdapter``; weights load unchanged). An encoder with no
    registered adapter class is refused, naming policy.adapters."""
    from nemo.core import adapter_mixins
    from omegaconf import open_dict

    registered = adapter_mixins.get_registered_adapter(config.encoder._target_)
    if registered is None:
        raise CheckpointError(f"policy.adapters: the encoder {config.encoder._target_} takes no adapters (NeMo "
                              "registers adapter classes for ConformerEncoder and ConvASREncoder); set "
                              "policy.adapters=0 to fine-tune the whole model")
    with open_dict(config):
        config.encoder._target_ = registered.adapter_class_path
    return config


def load_nemo_model(path_or_name: str, map_location: str | torch.device = "cpu", adapter_ready: bool = False):
    """Restore a NeMo ASR model from a .nemo file, or download a pretrained one by name; with
    ``adapter_ready``, built with its encoder's adapter class (``adapter_ready_config``)."""
    from nemo.collections.asr.models import ASRModel

    from rlnf.checkpoint import check_nemo_archive

    from rlnf.io import nemo_file_problem

    candidate = Path(path_or_name).expanduser()
    local = candidate.suffix == ".nemo" or candidate.exists() or candidate.is_symlink()
    if local:
        problem = nemo_file_problem(candidate)
        if problem:
            raise CheckpointError(f"policy checkpoint {path_or_name} {problem}")
        check_nemo_archive(candidate)
    restore, source = (ASRModel.restore_from, str(candidate)) if local else (ASRModel.from_pretrained, path_or_name)
    try:
        override = adapter_ready_config(restore(source, return_config=True)) if adapter_ready else None
        return restore(source, map_location=map_location, override_config_path=override)
    except CheckpointError:
        raise
    except Exception as exc:
        if local:
            raise CheckpointError(f"cannot restore NeMo model from {candidate}: {exc}") from exc
        raise CheckpointError(f"cannot load pretrained model {path_or_name!r} (is it a local path? a name needs "
                              f"network access): {exc}") from exc


def ctc_head(model, decoder: str = "auto") -> tuple[torch.nn.Module, bool]:
    """The CTC decoder of a NeMo ASR model, and whether the model is a hybrid RNNT/TDT-CTC model.

    A CTC model (``EncDecCTCModel``, its BPE class: QuartzNet, Citrinet, Conformer-CTC,
    FastConformer-CTC) has one head, ``model.decoder``. A hybrid (``EncDecHybridRNNTCTCModel``, its BPE
    class) has two on one encoder; the policy is its CTC head, ``model.ctc_decoder``. Any other model
    has no CTC head and is refused, naming the key."""
    from nemo.collections.asr.models import EncDecCTCModel, EncDecHybridRNNTCTCModel

    from rlnf.config import POLICY_DECODERS

    if decoder not in POLICY_DECODERS:
        raise CheckpointError(f"policy.decoder={decoder!r} is not valid; choose one of {', '.join(POLICY_DECODERS)}")
    if isinstance(model, EncDecCTCModel):
        return model.decoder, False
    if isinstance(model, EncDecHybridRNNTCTCModel):
        return model.ctc_decoder, True
    raise CheckpointError(f"{type(model).__name__} has no CTC head, so policy.decoder={decoder} has nothing to train: "
                          "rlnf fine-tunes CTC models (EncDecCTCModel, EncDecCTCModelBPE) and the CTC head of hybrid "
                          "RNNT/TDT-CTC models (EncDecHybridRNNTCTCModel, EncDecHybridRNNTCTCBPEModel)")


def keep_encoder_passes_local(model) -> None:
    """Take the hidden collective out of NeMo's encoder forward.

    In a process group, NeMo's ``ConvASREncoder`` (QuartzNet, Citrinet) all-reduces the batch's
    length on every forward, and ``ConformerEncoder`` does so while ``sync_max_audio_length`` is
    on, only to size a length buffer alike on every process. A forward that runs on one process and
    not on another (a reference-cache hit, a shorter validation shard, a reward that raised before
    the reference pass) then waits forever on the others. The buffer's size never changes the
    outputs, so here each process sizes it from its own batches."""
    from nemo.collections.asr.parts.submodules.jasper import MaskedConv1d, SqueezeExcite

    for module in model.modules():
        if hasattr(module, "sync_max_audio_length"):  # ConformerEncoder and its descendants
            module.sync_max_audio_length = False
        elif callable(getattr(module, "update_max_sequence_length", None)) and hasattr(module, "max_audio_length"):
            module.update_max_sequence_length = _local_length_update(module, MaskedConv1d, SqueezeExcite)


def _local_length_update(encoder, masked_conv, squeeze_excite):
    """``encoder.update_max_sequence_length`` with NeMo's sizing rule but no all-reduce."""

    def update(seq_length: int, device) -> None:
        if seq_length <= encoder.max_audio_length:
            return
        length = seq_length * 2 if seq_length < 5000 else int(seq_length * 1.5) if seq_length < 10000 else seq_length
        encoder.max_audio_length = length
        seq_range = torch.arange(0, length, device=next(encoder.parameters()).device)
        if hasattr(encoder, "seq_range"):
            encoder.seq_range = seq_range
        else:
            encoder.register_buffer("seq_range", seq_range, persistent=False)
        for module in encoder.modules():
            if isinstance(module, masked_conv):
                module.update_masked_length(length, seq_range=seq_range)
            elif isinstance(module, squeeze_excite):
                module.set_max_len(length, seq_range=seq_range)

    return update


class CTCPolicy:
    """Wraps a NeMo CTC model (``EncDecCTCModel``, ``EncDecCTCModelBPE``) or the CTC head of a hybrid
    RNNT/TDT-CTC model (``EncDecHybridRNNTCTCModel``, its BPE class), chosen by ``decoder``
    (``policy.decoder``: 'auto' or 'ctc', see ``ctc_head``).

    For a hybrid, the RNNT/TDT decoder and joint are frozen here (``requires_grad`` off): they get no
    gradient, no optimizer state, and DDP leaves them out; export writes them back unchanged."""

    def __init__(self, model, decoder: str = "auto"):
        self.decoder = decoder
        self.adapter_dim = 0  # > 0 once add_adapters made only adapters trainable
        self.head, self.hybrid = ctc_head(model, decoder)
        if self.hybrid:
            for module in (model.decoder, model.joint):
                module.requires_grad_(False)
            log.log(logging.WARNING if decoder == "auto" else logging.INFO,
                    "%s is a hybrid RNNT/TDT-CTC model: policy.decoder=%s trains its CTC head and the shared encoder; "
                    "the RNNT/TDT decoder and joint stay frozen but see the changed encoder (set policy.decoder=ctc "
                    "to choose the CTC head explicitly)", type(model).__name__, decoder)
        self.model = model
        keep_encoder_passes_local(model)
        # What ``forward`` runs when gradients are on: the model itself, or its DistributedDataParallel
        # wrapper in a multi-process run (gradient-free passes always run the bare model, so
        # rank-local inference such as sharded validation never waits on a collective; see
        # ``keep_encoder_passes_local`` for the encoder's own).
        self.train_module = model
        self.tokenizer = getattr(model, "tokenizer", None)
        self.blank_id = int(self.head.num_classes_with_blank) - 1
        self.sample_rate = int(model.cfg.preprocessor.sample_rate)
        self.vocabulary: list[str] = list(self.head.vocabulary)
        self._char_to_id = {char: index for index, char in enumerate(self.vocabulary)}

    @classmethod
    def load(cls, path_or_name: str, device: torch.device | str = "cpu", decoder: str = "auto",
             adapters: int = 0) -> "CTCPolicy":
        """Restore a policy; ``adapters`` > 0 adds and trains only adapters of that size (``add_adapters``)."""
        policy = cls(load_nemo_model(path_or_name, map_location=device, adapter_ready=adapters > 0), decoder)
        if adapters:
            policy.add_adapters(adapters)
        policy.model.to(device)
        return policy

    def add_adapters(self, dim: int) -> None:
        """Give every encoder layer a NeMo ``LinearAdapter`` (LayerNorm, d -> dim -> d, added to the layer's
        output; its last projection starts at zero, so the model's outputs start unchanged), enable only
        those, and make them the only trainable parameters. Adapters of that name already in the model
        (a .nemo exported by an adapter run) are kept and trained on. The model must have been restored
        adapter-ready (``load_nemo_model``)."""
        from nemo.collections.common.parts.adapter_modules import LinearAdapterConfig
        from nemo.core import adapter_mixins

        if not isinstance(self.model.encoder, adapter_mixins.AdapterModuleMixin):
            raise CheckpointError(f"policy.adapters: {type(self.model.encoder).__name__} takes no adapters")
        if ADAPTER_NAME in self.model.encoder.get_enabled_adapters():
            log.info("policy.adapters: training the %r adapters the checkpoint holds", ADAPTER_NAME)
        else:  # in_features: NeMo sets each layer's own width
            self.model.add_adapter(ADAPTER_NAME, cfg=LinearAdapterConfig(in_features=self.model.encoder._feat_out,
                                                                         dim=dim))
        self.model.set_enabled_adapters(enabled=False)
        self.model.set_enabled_adapters(ADAPTER_NAME, enabled=True)
        self.model.requires_grad_(False)
        for module in self.model.modules():
            if hasattr(module, "adapter_layer") and ADAPTER_NAME in module.adapter_layer:
                module.adapter_layer[ADAPTER_NAME].requires_grad_(True)
        self.adapter_dim = dim

    @contextlib.contextmanager
    def adapters_off(self):
        """The base model for the duration: this policy's adapters switched off, then on again."""
        self.model.set_enabled_adapters(ADAPTER_NAME, enabled=False)
        try:
            yield
        finally:
            self.model.set_enabled_adapters(ADAPTER_NAME, enabled=True)

    def frozen_reference(self, path_or_name: str) -> "CTCPolicy | AdaptersOff":
        """The KL reference: this module with its adapters off when it trains adapters (no second copy of
        the model), else a second, frozen restore of ``path_or_name``."""
        if self.adapter_dim:
            return AdaptersOff(self)
        # 'ctc': the policy has already said (and warned, for a hybrid under 'auto') which head it trains.
        return CTCPolicy.load(path_or_name, self.device, "ctc").freeze()

    # ------------------------------------------------------------------ modes and parameters
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def set_mode(self, mode: str, batchnorm: str = "frozen", dropout: bool = False) -> None:
        """'rollout' or 'eval': everything in eval mode. 'update': eval mode, except BatchNorm when
        ``batchnorm == 'train'`` and dropout when ``dropout``. SpecAugment and dither stay off
        (NeMo applies them only to modules in train mode)."""
        self.model.eval()
        if mode == "update":
            for module in self.model.encoder.modules():
                if batchnorm == "train" and isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.train()
                if dropout and isinstance(module, torch.nn.Dropout):
                    module.train()
        elif mode not in ("rollout", "eval"):
            raise ValueError(f"unknown mode {mode!r}")

    def batchnorm_layers(self) -> list[torch.nn.modules.batchnorm._BatchNorm]:
        """The encoder's BatchNorm layers that keep running statistics, in module order."""
        return [module for module in self.model.encoder.modules()
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats]

    def adapt_batchnorm(self, batches: Iterable) -> dict[str, int]:
        """Test-time BatchNorm adaptation: re-estimate the running mean and variance of every encoder
        BatchNorm from the audio of ``batches`` (``AudioBatch``es; no transcripts, no gradients, no
        weight changes). Each layer's new statistics are the plain average over the batches of its
        batch mean and unbiased batch variance (``momentum=None``, as ``torch.optim.swa_utils.update_bn``
        estimates them), with every later layer seeing the earlier layers' batch statistics. Everything
        else runs in eval mode (no dropout, SpecAugment or dither). The model is left in eval mode; when
        this raises (no audio, a clip that cannot be read), its statistics are what they were before.
        Returns ``{"layers", "batches", "utterances"}``."""
        layers = self.batchnorm_layers()
        if not layers:
            raise CheckpointError(f"{type(self.model).__name__}: the encoder has no BatchNorm layer to adapt")
        momenta = [layer.momentum for layer in layers]
        saved = [(layer.running_mean.clone(), layer.running_var.clone(), layer.num_batches_tracked.clone())
                 for layer in layers]
        counted = {"layers": len(layers), "batches": 0, "utterances": 0}
        try:
            for layer in layers:
                layer.reset_running_stats()
                layer.momentum = None  # cumulative average of the batch statistics
            self.model.eval()
            for layer in layers:
                layer.train()
            with torch.no_grad():
                for batch in batches:
                    self.forward(batch.audio.to(self.device), batch.audio_len.to(self.device))
                    counted["batches"] += 1
                    counted["utterances"] += len(batch.audio_len)
            if not counted["batches"]:
                raise DataError("BatchNorm adaptation got no audio: the manifest has no usable clip")
        except BaseException:
            with torch.no_grad():
                for layer, (mean, var, tracked) in zip(layers, saved):
                    layer.running_mean.copy_(mean)
                    layer.running_var.copy_(var)
                    layer.num_batches_tracked.copy_(tracked)
            raise
        finally:
            for layer, momentum in zip(layers, momenta):
                layer.momentum = momentum
            self.model.eval()
        return counted

    def freeze(self) -> "CTCPolicy":
        """Make this a frozen reference: eval mode, no gradients."""
        self.model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        return self

    # ------------------------------------------------------------------ forward and sampling
    def forward(self, audio: torch.Tensor, audio_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One encoder pass. Returns log_probs [B, T, V] (T = max encoded_len) and encoded_len [B]."""
        module = self.train_module if torch.is_grad_enabled() else self.model
        if self.hybrid:  # a hybrid's forward stops at the encoder; its CTC head runs here
            encoded, encoded_len = module(input_signal=audio, input_signal_length=audio_len)
            log_probs = self.head(encoder_output=encoded)
        else:
            log_probs, encoded_len, _ = module(input_signal=audio, input_signal_length=audio_len)
        # The decoder may emit padding frames past encoded_len (pad_to); they are never used.
        return log_probs[:, : int(encoded_len.max())], encoded_len

    def sample(self, log_probs: torch.Tensor, encoded_len: torch.Tensor, num_samples: int,
               generator: torch.Generator | None = None, uniforms: torch.Tensor | None = None) -> Samples:
        """K hypotheses per utterance from (temperature-scaled) log-probs; no gradients."""
        batch = log_probs.shape[0]
        alignments = ctc.sample_alignments(log_probs, encoded_len, num_samples, self.blank_id, generator, uniforms)
        labels, label_len = ctc.collapse_alignments(alignments.reshape(batch * num_samples, -1), self.blank_id)
        texts = self.decode(labels, label_len)
        return Samples(labels=labels.reshape(batch, num_samples, -1), label_len=label_len.reshape(batch, num_samples),
                       texts=[texts[b * num_samples:(b + 1) * num_samples] for b in range(batch)])

    def nbest(self, log_probs: torch.Tensor, encoded_len: torch.Tensor, beam_size: int) -> Samples:
        """The ``beam_size`` most likely distinct transcripts per utterance, best first.

        Candidates come from NeMo's batched CTC beam search (no language model) run twice as wide:
        its beams can hold one transcript twice and its scores only approximate the marginal, so the
        candidates are de-duplicated and ranked by their exact log pi(y) (``ctc.sequence_log_probs``).
        A list with fewer distinct transcripts is padded by repeating its best one (see
        ``ctc.first_occurrences``)."""
        from nemo.collections.asr.parts.submodules.ctc_beam_decoding import BeamBatchedCTCInfer

        decoder = BeamBatchedCTCInfer(blank_index=self.blank_id, beam_size=2 * beam_size,
                                      return_best_hypothesis=False, allow_cuda_graphs=False)
        log_probs = log_probs.detach().float()
        (beams,) = decoder(decoder_output=log_probs, decoder_lengths=encoded_len)
        candidates = [list(dict.fromkeys(tuple(int(i) for i in hypothesis.y_sequence)
                                         for hypothesis in beam.n_best_hypotheses)) or [()] for beam in beams]
        width = max(len(group) for group in candidates)
        labels, label_len = labels_to_padded([list(group[k]) if k < len(group) else [] for group in candidates
                                              for k in range(width)], device=log_probs.device)
        batch = log_probs.shape[0]
        scores = ctc.sequence_log_probs(log_probs, encoded_len, labels.reshape(batch, width, -1),
                                        label_len.reshape(batch, width), self.blank_id)
        present = torch.tensor([[k < len(group) for k in range(width)] for group in candidates], device=scores.device)
        order = scores.masked_fill(~present, float("-inf")).argsort(dim=1, descending=True, stable=True)
        sequences = []
        for b, group in enumerate(candidates):
            ranked = [group[k] for k in order[b, : min(beam_size, len(group))].tolist()]
            sequences.extend(list(y) for y in ranked + [ranked[0]] * (beam_size - len(ranked)))
        labels, label_len = labels_to_padded(sequences, device=log_probs.device)
        texts = self.decode(labels, label_len)
        return Samples(labels=labels.reshape(batch, beam_size, -1), label_len=label_len.reshape(batch, beam_size),
                       texts=[texts[b * beam_size:(b + 1) * beam_size] for b in range(batch)])

    def greedy(self, log_probs: torch.Tensor, encoded_len: torch.Tensor) -> Samples:
        """The most likely alignment's transcript per utterance (K = 1)."""
        alignments = ctc.greedy_alignments(log_probs, encoded_len, self.blank_id)
        labels, label_len = ctc.collapse_alignments(alignments, self.blank_id)
        texts = self.decode(labels, label_len)
        return Samples(labels=labels.unsqueeze(1), label_len=label_len.unsqueeze(1), texts=[[t] for t in texts])

    @torch.inference_mode()
    def transcribe(self, audio: torch.Tensor, audio_len: torch.Tensor) -> list[str]:
        """Greedy transcripts of a padded batch (eval mode is the caller's responsibility)."""
        log_probs, encoded_len = self.forward(audio, audio_len)
        return [texts[0] for texts in self.greedy(log_probs, encoded_len).texts]

    # ------------------------------------------------------------------ text <-> labels
    def decode(self, labels: torch.Tensor, label_len: torch.Tensor) -> list[str]:
        """Label ids [N, L] with lengths [N] -> N strings."""
        rows = labels.tolist()
        lengths = label_len.tolist()
        if self.tokenizer is not None:
            return [self.tokenizer.ids_to_text(row[:n]) if n else "" for row, n in zip(rows, lengths)]
        vocabulary = self.vocabulary
        return ["".join(vocabulary[i] for i in row[:n]) for row, n in zip(rows, lengths)]

    def outside_vocabulary(self, text: str) -> list[str]:
        """The characters (words, for a BPE model) of a normalised ``text`` that this policy can never
        produce; empty when it can produce all of it."""
        if self.tokenizer is None:
            return sorted({char for char in text if char not in self._char_to_id})
        unk = getattr(self.tokenizer, "unk_id", None)
        if unk is None or unk not in self.tokenizer.text_to_ids(text):
            return []
        return sorted({word for word in text.split() if unk in self.tokenizer.text_to_ids(word)})

    def encode_text(self, text: str, oov: str = "error", where: str = "", lowercase: bool = True) -> list[int] | None:
        """Reference text -> label ids for a CTC target.

        Characters the vocabulary lacks are never dropped silently: ``oov='error'`` raises a
        DataError naming ``where`` and the characters; 'skip' returns None (the caller counts it);
        'drop' removes them with a warning.
        """
        text = normalize_text(text, lowercase)
        bad = self.outside_vocabulary(text)
        if not bad and self.tokenizer is not None:
            return list(self.tokenizer.text_to_ids(text))
        if not bad:
            return [self._char_to_id[char] for char in text]
        if oov == "error":
            raise DataError(f"{where}: characters outside the policy's vocabulary: {bad!r} (set data.oov=skip or "
                            "data.oov=drop to handle them)")
        if oov == "skip":
            return None
        log.warning("%s: dropping characters outside the policy's vocabulary: %r", where, bad)
        if self.tokenizer is not None:
            return [i for i in self.tokenizer.text_to_ids(text) if i != getattr(self.tokenizer, "unk_id", None)]
        return [self._char_to_id[char] for char in text if char in self._char_to_id]

    def save(self, path: str | Path) -> None:
        """Write a .nemo atomically."""
        from rlnf.io import atomic_save

        atomic_save(path, lambda tmp: self.model.save_to(str(tmp)))


class AdaptersOff:
    """The frozen reference of a policy that trains adapters: the policy's own module run with its
    adapters switched off. It offers what a reference is asked for (``forward``, ``device``); the
    adapters start at zero output, so at step 0 it equals the policy."""

    def __init__(self, policy: CTCPolicy):
        self.policy = policy

    @property
    def device(self) -> torch.device:
        return self.policy.device

    def forward(self, audio: torch.Tensor, audio_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log_probs [B, T, V] and encoded_len [B] of the base model, without gradients, in eval mode (as the
        rollout that asks for them has already set)."""
        self.policy.set_mode("rollout")
        with torch.no_grad(), self.policy.adapters_off():
            return self.policy.forward(audio, audio_len)


@torch.no_grad()
def batch_dependence(policy: CTCPolicy | AdaptersOff, clips: Sequence[torch.Tensor]) -> float:
    """How much a clip's log-probs depend on the rest of its batch: the largest absolute difference
    (nats) between log_probs [T, V] of each clip run alone and the same clip's valid frames
    (``encoded_len``) in one zero-padded batch of all ``clips`` (1-D waveforms). The batch also holds
    the longest clip and half of it again, so every clip given is padded. Runs in float32 in the
    policy's current mode (a frozen reference: eval). Infinite when a clip's frame count changes."""
    longest = max(clips, key=len)
    batch = [*clips, torch.cat([longest, longest[: len(longest) // 2]])]
    audio_len = torch.tensor([len(clip) for clip in batch], device=policy.device)
    audio = torch.zeros(len(batch), int(audio_len.max()), device=policy.device)
    for row, clip in enumerate(batch):
        audio[row, : len(clip)] = clip.to(policy.device)
    batched, encoded_len = policy.forward(audio, audio_len)
    largest = 0.0
    for row, clip in enumerate(clips):
        alone, alone_len = policy.forward(audio[row: row + 1, : len(clip)], audio_len[row: row + 1])
        frames = int(encoded_len[row])
        if int(alone_len[0]) != frames:
            return float("inf")
        largest = max(largest, float((alone[0, :frames].float() - batched[row, :frames].float()).abs().max()))
    return largest


def labels_to_padded(sequences: Sequence[Sequence[int]], device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """List of label-id lists -> (labels [N, L] zero-padded, label_len [N])."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    labels = torch.zeros(len(sequences), max(1, int(lengths.max()) if len(sequences) else 1), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            labels[row, :len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    return (labels.to(device), lengths.to(device)) if device is not None else (labels, lengths)
