"""Every NeMo CTC model family rlnf fine-tunes, each a tiny model built from ``rlnf.models.family_config``:
RL steps through the CLI, an exported .nemo that restores as the same class and decodes, a reference
whose log-probs do not depend on the batch (so the reference cache holds), and hybrid RNNT-CTC and
TDT-CTC models whose transducer decoder and joint RL leaves alone."""

from __future__ import annotations

import pytest
import torch

from rlnf.cli import main
from rlnf.metric_logging import read_metrics

# (family, tokenizer): 'bpe' builds the family's BPE class with the in-process SentencePiece tokenizer.
CASES = [("quartznet", "chars"), ("citrinet", "bpe"), ("conformer", "bpe"), ("fastconformer", "bpe"),
         ("hybrid", "bpe"), ("hybrid", "chars"), ("hybrid_tdt", "bpe"), ("hybrid_tdt", "chars")]
IDS = [f"{family}-{tokens}" for family, tokens in CASES]
# QuartzNet (characters) runs RL through the CLI and restores its export in test_rl_finetune_cli.
RL_CASES, RL_IDS = CASES[1:], IDS[1:]


def build(family: str, tokens: str, tokenizer_dir: str):
    """A tiny ``family`` model (seed 0): characters, or BPE with the tokenizer in ``tokenizer_dir``."""
    from rlnf.models import ENGLISH_LABELS, build_family_model

    if tokens == "bpe":
        return build_family_model(family, tokenizer_dir=tokenizer_dir, seed=0)
    return build_family_model(family, labels=ENGLISH_LABELS, seed=0)


def as_if_trained(model):
    """Shift normalisation statistics away from their initial values, as training does: padded frames are
    then no longer zero after a block, so padding that reaches a clip's frames shows (random-initialised
    BatchNorm maps zeros to zeros and would hide an unmasked layer)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.fill_(-0.5)
        if isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.normal_(module.bias, std=0.5, generator=torch.Generator().manual_seed(0))
    return model


def train_dataset(corpus: dict, count: int):
    """The first ``count`` utterances of the corpus's training manifest as an ``AudioDataset``."""
    from rlnf.data.loader import AudioDataset
    from rlnf.data.manifest import read_manifest

    utterances, _ = read_manifest(corpus["train"])
    return AudioDataset(utterances[:count], 16000)


def corpus_clips(corpus: dict, count: int) -> list[torch.Tensor]:
    dataset = train_dataset(corpus, count)
    return [torch.from_numpy(dataset[i][0]) for i in range(count)]


@pytest.mark.parametrize(("family", "tokens"), CASES, ids=IDS)
def test_reference_log_probs_do_not_depend_on_the_batch(family, tokens, bpe_tokenizer_dir, corpus, nemo_quiet):
    """The reference cache's assumption, per family: a clip alone and padded in a batch give the same
    log-probs to float rounding (docs/model-families.md records the figures)."""
    from rlnf.policy import CTCPolicy, batch_dependence
    from rlnf.reference import CACHE_TOLERANCE

    reference = CTCPolicy(as_if_trained(build(family, tokens, bpe_tokenizer_dir)), decoder="ctc").freeze()
    difference = batch_dependence(reference, corpus_clips(corpus, 3))
    print(f"{family}-{tokens}: batch dependence {difference:.2e} nats")
    assert difference < CACHE_TOLERANCE


def test_a_batch_dependent_reference_switches_the_cache_off(corpus, nemo_quiet, warnings_of):
    """A QuartzNet without convolution masks lets padding into a clip's frames: the check sees it."""
    from rlnf.models import ENGLISH_LABELS, build_family_model
    from rlnf.policy import CTCPolicy
    from rlnf.reference import ReferenceCache, checked_reference_cache

    def reference(conv_mask: bool) -> CTCPolicy:
        model = as_if_trained(build_family_model("quartznet", labels=ENGLISH_LABELS, seed=0))
        for module in model.encoder.modules():
            if hasattr(module, "use_mask"):  # ConvASREncoder(conv_mask=False), without rebuilding
                module.use_mask = conv_mask
        return CTCPolicy(model).freeze()

    dataset = train_dataset(corpus, 4)
    assert isinstance(checked_reference_cache(reference(True), dataset, 2**20), ReferenceCache)
    messages = warnings_of("rlnf.reference")
    assert checked_reference_cache(reference(False), dataset, 2**20) is None
    assert any("reference cache is off" in message for message in messages)


@pytest.mark.parametrize("family", ["hybrid", "hybrid_tdt"])
def test_hybrid_policy_is_its_ctc_head_and_freezes_the_rnnt_head(family, bpe_tokenizer_dir, nemo_quiet, warnings_of):
    from omegaconf import OmegaConf

    from rlnf.config import TrainerConfig
    from rlnf.policy import CTCPolicy
    from rlnf.training import build_optimizer

    messages = warnings_of("rlnf.policy")
    policy = CTCPolicy(build(family, "bpe", bpe_tokenizer_dir), decoder="auto")
    assert policy.hybrid and policy.head is policy.model.ctc_decoder
    assert any("hybrid" in message and "policy.decoder=ctc" in message for message in messages)
    frozen = {id(p) for module in (policy.model.decoder, policy.model.joint) for p in module.parameters()}
    optimized = {id(p) for group in build_optimizer(policy.model.parameters(), TrainerConfig()).param_groups
                 for p in group["params"]}
    assert frozen and not frozen & optimized
    assert {id(p) for p in policy.model.encoder.parameters()} <= optimized
    assert {id(p) for p in policy.head.parameters()} <= optimized
    policy.set_mode("rollout")
    with torch.no_grad():
        log_probs, encoded_len = policy.forward(torch.randn(2, 16000) * 0.1, torch.tensor([16000, 9000]))
    assert log_probs.shape[-1] == policy.blank_id + 1 == len(policy.vocabulary) + 1
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(()), atol=1e-4)
    assert OmegaConf.select(policy.model.cfg, "aux_ctc.decoder") is not None


def test_a_model_without_a_ctc_head_is_refused_naming_the_key(nemo_quiet):
    from nemo.collections.asr.models import EncDecRNNTModel
    from omegaconf import OmegaConf

    from rlnf.config import RLFinetuneConfig, load_config
    from rlnf.errors import CheckpointError, ConfigError
    from rlnf.models import ENGLISH_LABELS, family_config
    from rlnf.policy import CTCPolicy

    config = family_config("hybrid", labels=ENGLISH_LABELS)
    del config["aux_ctc"]
    with pytest.raises(CheckpointError, match=r"EncDecRNNTModel has no CTC head.*policy\.decoder=ctc"):
        CTCPolicy(EncDecRNNTModel(cfg=OmegaConf.create(config)), decoder="ctc")
    with pytest.raises(ConfigError, match=r"policy\.decoder='rnnt' is not valid; choose one of auto, ctc"):
        load_config(RLFinetuneConfig, None, ["policy.path=x.nemo", "data.train_manifest=x.json", "output_dir=x",
                                             "policy.decoder=rnnt"])


@pytest.mark.slow
@pytest.mark.parametrize(("family", "tokens"), RL_CASES, ids=RL_IDS)
def test_family_runs_rl_and_its_export_restores_and_decodes(family, tokens, bpe_tokenizer_dir, corpus,
                                                             tmp_path, nemo_quiet):
    """One GRPO step (KL on, reference cache checked) through `rlnf run`; last.nemo restores as the
    same class and transcribes with NeMo's own transcribe (a TDT hybrid with TDT greedy decoding); a
    hybrid's RNNT/TDT decoder and joint are bit-identical after RL while its encoder and CTC head moved."""
    from nemo.collections.asr.models import ASRModel

    from rlnf.policy import CTCPolicy

    start = tmp_path / "start.nemo"
    model = build(family, tokens, bpe_tokenizer_dir)
    model.save_to(str(start))
    out = tmp_path / "run"
    decoder = "auto" if (family, tokens) == ("hybrid_tdt", "chars") else "ctc"  # auto takes a hybrid's CTC head too
    assert main(["run", "rl_finetune", "--config", "rl/grpo", f"policy.path={start}", f"policy.decoder={decoder}",
                 f"data.train_manifest={corpus['train']}", f"output_dir={out}", "trainer.max_steps=1",
                 "trainer.batch_size=2", "algorithm.num_samples=3", "trainer.progress_bar=false",
                 "trainer.lr=1e-3"]) == 0
    assert [row["step"] for row in read_metrics(out)] == [1]

    restored = ASRModel.restore_from(str(out / "checkpoints" / "last.nemo"), map_location="cpu")
    assert type(restored) is type(model)
    before, after = model.state_dict(), restored.state_dict()
    assert before.keys() == after.keys()
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert any(name.startswith("encoder.") for name in moved)
    if family.startswith("hybrid"):
        assert not any(name.startswith(("decoder.", "joint.")) for name in moved), sorted(moved)
        assert any(name.startswith("ctc_decoder.") for name in moved)
    if family == "hybrid_tdt":  # NeMo's default decoder for the export: TDT greedy, one logit per duration
        assert restored.cfg.decoding.model_type == "tdt" and restored.joint.num_extra_outputs == 5
        assert "TDT" in type(restored.decoding.decoding).__name__
    wav = train_dataset(corpus, 1).utterances[0].audio_filepath
    hypotheses = restored.transcribe([wav], batch_size=1, verbose=False)
    assert len(hypotheses) == 1 and isinstance(getattr(hypotheses[0], "text", hypotheses[0]), str)
    policy = CTCPolicy(restored, decoder="ctc")
    policy.set_mode("eval")
    clip = corpus_clips(corpus, 1)[0]
    assert isinstance(policy.transcribe(clip.unsqueeze(0), torch.tensor([len(clip)]))[0], str)



@pytest.mark.parametrize(("family", "tokens"), CASES, ids=IDS)
def test_batchnorm_adaptation_moves_every_family_s_statistics_and_nothing_else(family, tokens, bpe_tokenizer_dir,
                                                                                corpus, nemo_quiet):
    """``CTCPolicy.adapt_batchnorm`` on each family: every encoder BatchNorm (QuartzNet's and Citrinet's
    blocks, the Conformers' convolution modules) gets new statistics from the clips, every weight and
    every other buffer stays, and the adapted policy still gives log-probabilities."""
    from rlnf.data.loader import eval_batches
    from rlnf.policy import CTCPolicy

    policy = CTCPolicy(as_if_trained(build(family, tokens, bpe_tokenizer_dir)), decoder="ctc")
    before = {name: value.clone() for name, value in policy.model.state_dict().items()}
    counted = policy.adapt_batchnorm(eval_batches(train_dataset(corpus, 6), batch_size=3))
    assert counted["batches"] == 2 and counted["utterances"] == 6 and counted["layers"] == len(policy.batchnorm_layers())
    after = policy.model.state_dict()
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    statistics = {name for name in before if name.startswith("encoder.") and
                  name.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert statistics and moved == statistics
    policy.set_mode("rollout")
    with torch.no_grad():
        log_probs, _ = policy.forward(torch.randn(1, 16000) * 0.1, torch.tensor([16000]))
    assert torch.isfinite(log_probs).all()
