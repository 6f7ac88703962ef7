"""SUTA: single-utterance test-time adaptation of a CTC policy (Lin et al., 2022).

For each utterance on its own: start from the given weights, take ``steps`` AdamW steps on the
unsupervised loss of that utterance's output distribution (``rlnf.tta.suta_loss``: entropy plus
minimum class confusion), transcribe it greedily with the adapted weights, then put every weight,
buffer and the optimizer back as they were. No transcripts, no reward model, no training run; the
cost is ``steps`` forward+backward passes and one forward pass per utterance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from rlnf.config.suta import SUTA_PARAMS, SUTAConfig  # noqa: F401  (re-exported: rlnf.adaptation.SUTAConfig)
from rlnf.data.loader import AudioBatch, AudioDataset, collate
from rlnf.errors import ConfigError
from rlnf.tta import suta_loss
NORM_LAYERS = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm)


@dataclass
class SUTAResult:
    """rows: one dict per utterance, in the dataset's order: audio_filepath, text (the reference or
    None), pred_text (after adaptation). losses: per utterance, the SUTA loss before each step and
    after the last one (steps + 1 values)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    losses: list[list[float]] = field(default_factory=list)


def adapted_parameters(policy, params: str) -> list[torch.nn.Parameter]:
    """The parameters SUTA updates (see ``SUTAConfig.params``), among those the policy trains (a hybrid's
    RNNT/TDT decoder and joint never are)."""
    model = policy.model
    if params == "all":
        chosen = list(model.parameters())
    elif params == "encoder":
        chosen = list(model.encoder.parameters())
    elif params == "norm":
        chosen = [parameter for module in model.modules() if isinstance(module, NORM_LAYERS)
                  for parameter in module.parameters(recurse=False)]
    else:
        raise ConfigError(f"params={params!r} is not valid; choose one of {', '.join(SUTA_PARAMS)}")
    chosen = [parameter for parameter in chosen if parameter.requires_grad]
    if not chosen:
        raise ConfigError(f"params={params}: {type(model).__name__} has no trainable parameter of that kind "
                          f"(choose another of {', '.join(SUTA_PARAMS)})")
    return chosen


def single_utterances(dataset: AudioDataset) -> Iterator[AudioBatch]:
    """Batches of one utterance each, in the dataset's order (unreadable clips skipped when the
    dataset skips them): no padding, so every frame is the utterance's own."""
    for index in range(len(dataset)):
        batch = collate([dataset[index]])
        if batch is not None:
            yield batch


def suta_transcribe(policy, dataset: AudioDataset, config: SUTAConfig,
                    device: torch.device | None = None) -> SUTAResult:
    """SUTA on every utterance of ``dataset``, each adapted from the same starting weights.

    Per utterance: a fresh AdamW over ``adapted_parameters``; ``config.steps`` times (forward, loss,
    backward, step) in the mode ``config.batchnorm`` sets, dropout, SpecAugment and dither off; then
    one forward pass in that mode (eval mode for 'frozen') and the greedy transcript; then the model's
    whole state (weights and buffers) is loaded back from a copy taken at the start. Afterwards the
    model is bit-identical to what it was, in eval mode, with its ``requires_grad`` flags as they were."""
    device = device or policy.device
    model = policy.model
    original = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    trainable = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    chosen = adapted_parameters(policy, config.params)
    chosen_ids = {id(parameter) for parameter in chosen}
    result = SUTAResult()
    try:
        for parameter in model.parameters():  # no gradient work for the weights that stay
            parameter.requires_grad_(id(parameter) in chosen_ids)
        for batch in single_utterances(dataset):
            text, losses = adapt_and_transcribe(policy, batch.to(device), chosen, config)
            model.load_state_dict(original)
            utterance = batch.utterances[0]
            result.rows.append({"audio_filepath": utterance.audio_filepath, "text": utterance.text, "pred_text": text})
            result.losses.append(losses)
    finally:
        model.load_state_dict(original)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(trainable[name])
        policy.set_mode("eval")
    return result


def adapt_and_transcribe(policy, batch: AudioBatch, chosen: list[torch.nn.Parameter],
                         config: SUTAConfig) -> tuple[str, list[float]]:
    """One utterance (``batch`` of one): the SUTA steps, then its greedy transcript. Leaves the
    weights adapted (the caller restores them). Returns (transcript, the loss before each step and
    after the last)."""
    optimizer = torch.optim.AdamW(chosen, lr=config.lr, weight_decay=config.weight_decay)
    losses = []

    def loss_of(log_probs: torch.Tensor, encoded_len: torch.Tensor) -> torch.Tensor:
        return suta_loss(log_probs.float(), encoded_len, config.temperature, config.em_weight,
                         policy.blank_id if config.exclude_blank_frames else None, config.mcc_reweight)

    policy.set_mode("update", batchnorm=config.batchnorm, dropout=False)
    for _ in range(config.steps):
        log_probs, encoded_len = policy.forward(batch.audio, batch.audio_len)
        loss = loss_of(log_probs, encoded_len)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():  # the transcript sees BatchNorm as the steps did
        log_probs, encoded_len = policy.forward(batch.audio, batch.audio_len)
        losses.append(float(loss_of(log_probs, encoded_len)))
        text = policy.greedy(log_probs.float(), encoded_len).texts[0][0]
    return text, losses
