"""policy.adapters: only NeMo LinearAdapters train, the reference is the same module with them off
(no second model), and the exported .nemo holds them and restores in NeMo."""

from __future__ import annotations

import pytest
import torch

from rlnf.cli import main
from tests.test_families import as_if_trained, build, train_dataset

# ConformerEncoder (FastConformer) and ConvASREncoder (QuartzNet): NeMo's two adapter-taking CTC encoders.
CASES = [("fastconformer", "bpe"), ("quartznet", "chars")]


@pytest.fixture()
def start_nemo(request, bpe_tokenizer_dir, tmp_path, nemo_quiet) -> str:
    family, tokens = request.param
    path = tmp_path / f"{family}.nemo"
    as_if_trained(build(family, tokens, bpe_tokenizer_dir)).save_to(str(path))
    return str(path)


@pytest.mark.parametrize("start_nemo", CASES, indirect=True, ids=[family for family, _ in CASES])
def test_only_adapters_train_and_the_reference_is_the_same_module_with_them_off(start_nemo):
    from rlnf.config import TrainerConfig
    from rlnf.policy import AdaptersOff, CTCPolicy
    from rlnf.training import build_optimizer

    policy = CTCPolicy.load(start_nemo, adapters=4)
    base = CTCPolicy.load(start_nemo)
    trainable = {name for name, p in policy.model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter_layer.rlnf." in name for name in trainable)
    optimized = {id(p) for group in build_optimizer(policy.model.parameters(), TrainerConfig()).param_groups
                 for p in group["params"]}
    assert optimized == {id(p) for p in policy.model.parameters() if p.requires_grad}

    reference = policy.frozen_reference(start_nemo)
    assert isinstance(reference, AdaptersOff) and reference.policy is policy  # no second model
    audio, audio_len = torch.randn(2, 16000) * 0.1, torch.tensor([16000, 11000])
    for each in (policy, base):
        each.set_mode("rollout")
    with torch.no_grad():
        expected, _ = base.forward(audio, audio_len)
        start, _ = policy.forward(audio, audio_len)
        torch.testing.assert_close(start, expected)  # adapters start at zero output
        for name, parameter in policy.model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
        moved, _ = policy.forward(audio, audio_len)
        off, _ = reference.forward(audio, audio_len)
        again, _ = policy.forward(audio, audio_len)
    assert (moved - expected).abs().max() > 1e-3
    torch.testing.assert_close(off, expected)
    torch.testing.assert_close(again, moved)  # switched back on


def test_adapters_need_frozen_batchnorm_naming_both_keys():
    from rlnf.config import RLFinetuneConfig, load_config
    from rlnf.errors import ConfigError

    required = ["policy.path=x.nemo", "data.train_manifest=x.json", "output_dir=x"]
    with pytest.raises(ConfigError, match=r"policy\.adapters needs policy\.batchnorm=frozen"):
        load_config(RLFinetuneConfig, None, [*required, "policy.adapters=8", "policy.batchnorm=train"])
    with pytest.raises(ConfigError, match=r"policy\.adapters=-1 must be >= 0"):
        load_config(RLFinetuneConfig, None, [*required, "policy.adapters=-1"])


@pytest.mark.slow
@pytest.mark.parametrize("start_nemo", CASES[:1], indirect=True, ids=["fastconformer"])
def test_adapter_run_exports_a_nemo_that_holds_the_adapters(start_nemo, corpus, tmp_path):
    """Two GRPO steps with policy.adapters=8 (KL on: the reference cache is checked against the
    adapters-off module); last.nemo restores in NeMo with the adapters enabled, only they moved."""
    from nemo.collections.asr.models import ASRModel

    out = tmp_path / "run"
    assert main(["run", "rl_finetune", "--config", "rl/grpo", f"policy.path={start_nemo}", "policy.adapters=8",
                 f"data.train_manifest={corpus['train']}", f"output_dir={out}", "trainer.max_steps=2",
                 "trainer.batch_size=2", "algorithm.num_samples=3", "trainer.progress_bar=false",
                 "trainer.lr=1e-2"]) == 0
    start = ASRModel.restore_from(start_nemo, map_location="cpu").state_dict()
    restored = ASRModel.restore_from(str(out / "checkpoints" / "last.nemo"), map_location="cpu")
    assert type(restored.encoder).__name__ == "ConformerEncoderAdapter"
    assert restored.get_enabled_adapters() == ["rlnf"]
    after = restored.state_dict()
    adapters = {name for name in after if ".adapter_layer.rlnf." in name}
    assert adapters and set(after) - adapters == set(start)
    assert all(torch.equal(start[name], after[name]) for name in start)
    restored.eval()
    audio, audio_len = torch.randn(1, 16000) * 0.1, torch.tensor([16000])
    with torch.no_grad():
        trained = restored(input_signal=audio, input_signal_length=audio_len)[0]
        restored.set_enabled_adapters("rlnf", enabled=False)
        base = restored(input_signal=audio, input_signal_length=audio_len)[0]
        restored.set_enabled_adapters("rlnf", enabled=True)
    assert (trained - base).abs().max() > 1e-4  # the adapters learned something (they start at zero output)
    wav = train_dataset(corpus, 1).utterances[0].audio_filepath
    assert isinstance(restored.transcribe([wav], batch_size=1, verbose=False)[0].text, str)
