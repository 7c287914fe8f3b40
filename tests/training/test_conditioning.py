"""Musical conditions from catalog metadata, attention at low resolution, and a pretrained text encoder loaded
from local weights (a tiny randomly initialised T5 the test saves; nothing is downloaded)."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from training.conditioning import (CONDITION_NAMES, KEY_NAMES, encode_conditions, instrument_bucket, parse_key,
                                   stack_conditions)
from training.model import AttentionBlock, MelUNet


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("text,index", [("C", 0), ("C major", 0), ("Am", 21), ("A minor", 21), ("a min", 21),
                                        ("F# major", 6), ("Gb", 6), ("Bbm", 22), ("D♭ major", 1), (23, 23)])
def test_parse_key_reads_common_spellings(text, index):
    assert parse_key(text) == index
    assert KEY_NAMES[index].split()[1] == ("minor" if index >= 12 else "major")


@pytest.mark.parametrize("text", ["H major", "C dorian", "", None, 24, "?"])
def test_parse_key_gives_none_for_unreadable_keys(text):
    assert parse_key(text) is None


def test_encode_conditions_reads_the_sample_json_and_marks_unknowns():
    vector = encode_conditions({"bpm": "128", "key": "E minor", "instrument": "Distortion Guitar", "duration_s": 10.0,
                                "text": "rock"})
    assert vector.dtype == np.float32 and vector.shape == (len(CONDITION_NAMES),)
    assert vector.tolist() == [128.0, 16.0, float(instrument_bucket("distortion guitar ")), 10.0]
    unknown = encode_conditions({"bpm": 5000, "key": "weird", "instrument": "", "duration_s": -1})
    assert np.isnan(unknown).all()
    assert np.isnan(encode_conditions(None)).all()
    assert encode_conditions({"instruments": ["Piano", "Bass"]})[2] == instrument_bucket("piano")
    assert stack_conditions([{"bpm": 90}, {}]).shape == (2, 4)


def _randomised(model: MelUNet) -> MelUNet:
    """Leave the zero-initialised regime so that every path shows in the output."""
    torch.manual_seed(1)
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv1d, torch.nn.Linear)):
            module.reset_parameters()
    return model.eval()


def test_each_musical_condition_reaches_the_output_and_unknown_is_its_own_value():
    torch.manual_seed(0)
    model = _randomised(MelUNet(n_mels=8, base_channels=8, channel_mults=(1, 2), text_dim=8, text_buckets=32,
                                musical_conditioning=True))
    metas = [{"bpm": 100, "key": "C", "instrument": "piano", "duration_s": 5}, {"bpm": 140, "key": "C",
             "instrument": "piano", "duration_s": 5}, {"bpm": 100, "key": "Am", "instrument": "piano", "duration_s": 5},
             {"bpm": 100, "key": "C", "instrument": "drums", "duration_s": 5}, {"bpm": 100, "key": "C",
             "instrument": "piano", "duration_s": 30}, {}]
    mel = torch.randn(1, 8, 16).repeat(len(metas), 1, 1)
    out = model(mel, torch.full((len(metas),), 10), ["x"] * len(metas), conditions=stack_conditions(metas))
    for other in range(1, len(metas)):
        assert not torch.allclose(out[0], out[other], atol=1e-5), other
    none = model(mel[:1], torch.tensor([10]), ["x"])  # no conditions = all unknown
    torch.testing.assert_close(none[0], out[-1])
    plain = MelUNet(n_mels=8, base_channels=8, channel_mults=(1,), text_dim=4, text_buckets=8)
    with pytest.raises(ValueError, match="without musical_conditioning"):
        plain(torch.randn(1, 8, 4), torch.tensor([0]), [""], conditions=stack_conditions([{}]))


def test_attention_mixes_all_frames_and_starts_as_identity():
    torch.manual_seed(0)
    block = AttentionBlock(16, heads=4)
    x = torch.randn(2, 16, 40)
    torch.testing.assert_close(block(x), x)  # zero-initialised output projection
    block.proj.reset_parameters()
    changed = x.clone()
    changed[..., -1] += 3.0
    with torch.no_grad():
        assert float((block(x) - block(changed))[..., 0].abs().max()) > 1e-4  # the first frame sees the last
    # a U-Net with attention starts as the same function as the one without
    torch.manual_seed(0)
    plain = _randomised(MelUNet(n_mels=8, base_channels=8, channel_mults=(1, 2), text_dim=8, text_buckets=32))
    attended = MelUNet(n_mels=8, base_channels=8, channel_mults=(1, 2), text_dim=8, text_buckets=32,
                       attention_levels=(1,), attention_heads=2).eval()
    missing, unexpected = attended.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all("attention" in key for key in missing)
    mel = torch.randn(2, 8, 30)
    torch.testing.assert_close(attended(mel, torch.tensor([3, 50]), ["a", "b"]), plain(mel, torch.tensor([3, 50]),
                                                                                        ["a", "b"]))
    model = MelUNet(n_mels=8, base_channels=16, channel_mults=(1, 2, 2), attention_levels=(-1,), attention_heads=4)
    assert set(model.down_attention) == {"2"} and model.mid_attention is not None
    rebuilt = MelUNet(**model.model_kwargs)
    rebuilt.load_state_dict(model.state_dict())  # strict: the kwargs rebuild the same architecture
    with pytest.raises(ValueError, match="attention_levels"):
        MelUNet(n_mels=8, base_channels=8, channel_mults=(1, 2), attention_levels=(2,))
    with pytest.raises(ValueError, match="must divide"):
        MelUNet(n_mels=8, base_channels=8, channel_mults=(1, 2), attention_levels=(0,), attention_heads=3)


def _save_tiny_t5(folder) -> None:
    """A randomly initialised 1-layer T5 encoder and a word-level tokenizer, saved as transformers would."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "piano", "drums", "calm", "bright", "sine", "mid", "low", "high", "noise"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                            eos_token="</s>").save_pretrained(folder)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(words), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, pad_token_id=0,
                      eos_token_id=1, decoder_start_token_id=0)
    T5EncoderModel(config).save_pretrained(folder)


def test_a_pretrained_text_encoder_loads_from_local_weights_and_stays_out_of_the_state_dict(tmp_path):
    _save_tiny_t5(tmp_path / "t5")
    torch.manual_seed(0)
    model = MelUNet(n_mels=8, base_channels=8, channel_mults=(1, 2), text_dim=8, text_encoder="pretrained",
                    text_encoder_path=str(tmp_path / "t5"))
    _randomised(model)
    keys = list(model.state_dict())
    assert {k for k in keys if k.startswith("text_encoder.")} == {
        "text_encoder.null_embedding", "text_encoder.proj.weight", "text_encoder.proj.bias"}
    assert all(not p.requires_grad for p in model.text_encoder._frozen[0].parameters())
    mel, t = torch.randn(1, 8, 16).repeat(3, 1, 1), torch.tensor([10, 10, 10])
    out = model(mel, t, ["piano calm", "drums bright", ""])
    assert not torch.allclose(out[0], out[1], atol=1e-5) and torch.isfinite(out).all()
    rebuilt = MelUNet(**model.model_kwargs)  # the checkpoint stores the folder, not the frozen weights
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt.eval()(mel, t, ["piano calm", "drums bright", ""]), out)
    # gradients reach the projection, not the frozen encoder
    model.train()
    model(mel, t, ["piano calm", "drums bright", ""]).square().mean().backward()
    assert model.text_encoder.proj.weight.grad is not None and model.text_encoder.proj.weight.grad.abs().sum() > 0
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        MelUNet(n_mels=8, base_channels=8, text_encoder="pretrained", text_encoder_path=str(tmp_path / "missing"))
